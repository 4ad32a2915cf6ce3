"""Optimizers: torch's own where it has one, Lion where it does not, one grouping rule."""

from cadence.optim.chained import AnyOptimizer, ChainedOptimizer
from cadence.optim.groups import muon_split, param_groups
from cadence.optim.lion import Lion
from cadence.optim.registry import (
    OPTIMIZERS,
    OptimizerSpec,
    build_optimizer,
    check_hparams,
    check_width_rule,
    is_schedule_free,
    set_train_mode,
)

__all__ = [
    "OPTIMIZERS",
    "AnyOptimizer",
    "ChainedOptimizer",
    "Lion",
    "OptimizerSpec",
    "build_optimizer",
    "check_hparams",
    "check_width_rule",
    "is_schedule_free",
    "muon_split",
    "param_groups",
    "set_train_mode",
]
