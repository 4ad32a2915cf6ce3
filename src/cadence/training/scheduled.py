"""What the schedules say for the current step, read at one position.

Mixed into the Trainer (as the stop decisions are): the LR, momentum, weight decay, sequence
length and batch size of a step all read the schedules at :attr:`ScheduledReads.position`. That
is the step itself, unless time is a budget and the run is further along its time budget than
along its horizon in steps (``Horizon.position``); reading every schedule at the same position
keeps them in step with each other when time drives them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cadence.training.trainer import Trainer


class ScheduledReads:
    """Mixed into Trainer: the step's scheduled values, all read at one position."""

    @property
    def position(self: Trainer) -> int:
        """The step every schedule reads (see the module doc)."""
        return self.horizon.position(self.state.step, self.state.clock_s)

    def lr_multiplier(self: Trainer, step: int) -> float:
        """warmup -> schedule, times the plateau factor, times the batch-ramp LR rule."""
        scale = self.plateau.scale if self.plateau is not None else 1.0
        return self.schedule(step) * scale * self.ramp.lr_scale_at(step) * self.state.lr_scale

    def apply_lr(self: Trainer) -> float:
        """Set the step's LR in every group, and its momentum and weight decay where those are
        scheduled; returns the config-level LR for the metrics row."""
        at = self.position
        mult = self.lr_multiplier(at)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * mult
        if self.hparams.active:
            self.scheduled = self.hparams.apply(self.optimizer, at, mult)
        if self.seq_len is not None:
            self.scheduled["seq_len"] = self.seq_len.length_at(at)
        return self.cfg.optimizer.lr * mult

    def batch_size(self: Trainer) -> int:
        return self.ramp.size_at(self.position)
