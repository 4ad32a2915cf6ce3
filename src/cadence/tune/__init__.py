"""Choosing hyperparameters: the LR range test, the gradient noise scale, Optuna sweeps.

Each is a plain function over a config (and optionally an already built workload), usable from
Python, from the CLI (``cadence find-lr | find-batch | tune``) and from the trainer
(``optimizer.lr: auto``, ``train.log_noise_scale``). Optuna is imported only by the sweep.
"""

from cadence.tune.lr_finder import LRFindResult, lr_range_test, suggest_lr, write_lr_find
from cadence.tune.noise_scale import (
    NoiseScaleEstimate,
    NoiseScaleEstimator,
    NoiseScaleMonitor,
    estimate_noise_scale,
    lr_for_batch,
)

__all__ = [
    "LRFindResult",
    "NoiseScaleEstimate",
    "NoiseScaleEstimator",
    "NoiseScaleMonitor",
    "estimate_noise_scale",
    "lr_for_batch",
    "lr_range_test",
    "suggest_lr",
    "write_lr_find",
]
