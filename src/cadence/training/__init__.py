"""The trainer: `fit` (the loop), `train_step` (one step), and `train` (a whole run)."""

from cadence.training.ema import EMA, ema_update
from cadence.training.events import Callback
from cadence.training.loop import fit
from cadence.training.run import train
from cadence.training.state import TrainState
from cadence.training.step import accumulate_gradients, grad_norm_and_clip, train_step
from cadence.training.trainer import Trainer

__all__ = [
    "EMA",
    "Callback",
    "TrainState",
    "Trainer",
    "accumulate_gradients",
    "ema_update",
    "fit",
    "grad_norm_and_clip",
    "train",
    "train_step",
]
