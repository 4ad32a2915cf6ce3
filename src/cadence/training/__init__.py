"""The trainer: `fit` (the loop), `Trainer` (its parts), the step, checkpoints.

A whole run with its directory, logs and outputs is one layer up (`cadence.run`, the public
`cadence.train`); this package trains a workload and knows nothing of files but checkpoints.
"""

from cadence.runtime.events import Callback
from cadence.training.ema import EMA, ema_update
from cadence.training.loop import fit
from cadence.training.state import TrainState
from cadence.training.step import (
    StepRead,
    accumulate_gradients,
    backward_step,
    grad_norm_and_clip,
    read_step,
    train_step,
)
from cadence.training.stopping import (
    StopKind,
    StopReason,
    budget_reached,
    converged,
    early_stop_due,
    is_better,
    target_reached,
)
from cadence.training.trainer import Trainer

__all__ = [
    "EMA",
    "Callback",
    "StepRead",
    "StopKind",
    "StopReason",
    "TrainState",
    "Trainer",
    "accumulate_gradients",
    "backward_step",
    "budget_reached",
    "converged",
    "early_stop_due",
    "ema_update",
    "fit",
    "grad_norm_and_clip",
    "is_better",
    "read_step",
    "target_reached",
    "train_step",
]
