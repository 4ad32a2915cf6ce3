"""LAWA: the uniform average of the latest k checkpoints as a readout (``train.lawa``).

Kaddour (2022, "Stop wasting my time!") and Sanyal et al. (2023, "Early weight averaging meets
high learning rates") average the weights of the last k checkpoints taken every n steps: the
average sits nearer the bottom of the valley the iterates bounce across, which is what decaying
the LR buys, without decaying it. ``benchmarks/weight_averaging.py`` measured it on the seed
suite's language model: at a constant LR it reached the validation loss of a WSD cooldown, and
beat the tail average and an EMA, which lagged (benchmarks/README.md). Under a schedule that
already decays it gains nothing, so it is off by default.

A callback, not part of the update: it copies weights into k float32 snapshots and at each
evaluation scores their mean as ``lawa_*`` metrics (the time it takes counts as evaluation
time, not training). The snapshots are checkpointed with the run, so a resumed run averages the
same weights; ``model_lawa.safetensors`` is written at the end, next to ``model.safetensors``,
in the same format. Why not torch's ``swa_utils.AveragedModel``: it keeps a running average of
everything since a start, not a sliding window of the latest k.
"""

from __future__ import annotations

import collections
import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cadence.io import atomic_path
from cadence.runtime.events import Callback, TrainerView
from cadence.training.checkpoint import save_weights
from cadence.training.ema import weights_applied

__all__ = ["LAWA"]


class LAWA(Callback):
    """Keep the latest ``k`` snapshots, one every ``every`` steps; score and save their mean."""

    state_key = "lawa"

    def __init__(self, k: int, every: int) -> None:
        if k < 1 or every < 1:
            raise ValueError(
                f"train.lawa: need k >= 1 snapshots every >= 1 steps, got {k}, {every}"
            )
        self.k, self.every = k, every
        self.snapshots: collections.deque[tuple[int, list[Tensor]]] = collections.deque(maxlen=k)

    def on_step(self, trainer: TrainerView) -> None:
        step = int(trainer.state.step)
        if step % self.every or (self.snapshots and self.snapshots[-1][0] == step):
            return
        with trainer.averaged_weights():  # schedule-free: its average, the point it evaluates
            self.snapshots.append(
                (step, [p.detach().float().clone() for p in trainer.model.parameters()])
            )

    def on_rewind(self, trainer: TrainerView, step: int) -> None:
        while self.snapshots and self.snapshots[-1][0] > step:  # restored with the checkpoint
            self.snapshots.pop()

    def mean(self) -> list[Tensor]:
        """The average of the snapshots, parameter by parameter (float32)."""
        return [torch.stack(ws).mean(0) for ws in zip(*(s for _, s in self.snapshots), strict=True)]

    def applied(self, model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        """The model with the averaged weights in place, put back afterwards."""
        return weights_applied(model, self.mean())

    def on_eval(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        if not self.snapshots:
            return
        model = trainer.model
        with trainer.clock.excluded("eval"), self.applied(model), torch.no_grad():
            model.eval()
            try:
                with trainer.autocast():
                    scored = trainer.workload.evaluate(model, trainer.world)
            finally:
                model.train()
        trainer.log_metrics({f"lawa_{k}": v for k, v in scored.items()})

    def on_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None:
        if not self.snapshots or trainer.run_dir is None or not trainer.world.is_main:
            return
        path = Path(trainer.run_dir) / "model_lawa.safetensors"
        with atomic_path(path) as tmp, self.applied(trainer.model):
            save_weights(trainer.model, tmp)

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "every": self.every, "snapshots": [list(s) for s in self.snapshots]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshots.clear()
        for step, weights in state["snapshots"]:
            self.snapshots.append((int(step), [w.float() for w in weights]))
