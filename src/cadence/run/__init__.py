"""A whole run: the config checked against its workload, training, and the run directory.

The layer above the trainer and the tuners (it resolves ``optimizer.lr: auto`` with the LR
range test and attaches the gradient-noise monitor); ``cadence.train`` and
``cadence.load_config`` are these functions.
"""

from cadence.run.configs import load_config
from cadence.run.rundir import default_run_dir, prepare_run_dir
from cadence.run.session import (
    RESUMABLE_KEYS,
    auto_resume,
    restart_count,
    resume,
    resume_config,
    run_callbacks,
    train,
)

__all__ = [
    "RESUMABLE_KEYS",
    "auto_resume",
    "default_run_dir",
    "load_config",
    "prepare_run_dir",
    "restart_count",
    "resume",
    "resume_config",
    "run_callbacks",
    "train",
]
