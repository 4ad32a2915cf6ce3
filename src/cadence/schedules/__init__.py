"""Training-progress schedules: pure LR multipliers, a composable plateau scale, batch ramps."""

from cadence.schedules.batch import LR_SCALING_RULES, AutoBatchRamp, BatchRamp, split_micro
from cadence.schedules.lr import (
    ANNEALING,
    SCHEDULES,
    Schedule,
    build_schedule,
    constant,
    cosine,
    exponential,
    inverse_sqrt,
    join,
    linear,
    multistep,
    onecycle,
    polynomial,
    step,
    warmup,
    wsd,
    wsd_cooldown_start,
)
from cadence.schedules.plateau import EMASmoother, Plateau

__all__ = [
    "LR_SCALING_RULES",
    "ANNEALING",
    "SCHEDULES",
    "AutoBatchRamp",
    "BatchRamp",
    "EMASmoother",
    "Plateau",
    "Schedule",
    "build_schedule",
    "constant",
    "cosine",
    "exponential",
    "inverse_sqrt",
    "join",
    "linear",
    "multistep",
    "onecycle",
    "polynomial",
    "split_micro",
    "step",
    "warmup",
    "wsd",
    "wsd_cooldown_start",
]
