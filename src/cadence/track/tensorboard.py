"""TensorBoard event files next to metrics.jsonl, for users who live in TensorBoard."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

from cadence.runtime.events import Callback, TrainerView

_SKIP = {"step"}


class TensorBoardLogger(Callback):
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer = None

    def on_start(self, trainer: TrainerView) -> None:
        self._open_at(trainer.state.step)

    def on_rewind(self, trainer: TrainerView, step: int) -> None:
        self._open_at(step)

    def _open_at(self, step: int) -> None:
        _without_tensorflow()
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is not None:
            self.writer.close()
        # purge_step hides events past `step` written before a crash or a rollback.
        self.writer = SummaryWriter(
            log_dir=str(self.log_dir), purge_step=step + 1 if step else None
        )

    def on_log(self, trainer: TrainerView, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key not in _SKIP and isinstance(value, (int, float)):
                group = "val" if key.startswith(("val_", "ema_")) else "train"
                self.writer.add_scalar(f"{group}/{key}", value, row["step"])

    def on_step(self, trainer: TrainerView) -> None:
        """train.inspect_every: each layer's statistics as scalars, and their spread over the
        layers as histograms (one per statistic and inspected step)."""
        record = trainer.inspection
        if record is None:
            return
        step = record["step"]
        spread: dict[str, list[float]] = {}
        for layer, stats in record["layers"].items():
            for stat, value in stats.items():
                self.writer.add_scalar(f"layers/{stat}/{layer}", value, step)
                if math.isfinite(value):
                    spread.setdefault(stat, []).append(value)
        for stat, values in spread.items():
            self.writer.add_histogram(f"layers/{stat}", np.asarray(values), step)

    def on_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None:
        self.close()

    def close(self) -> None:
        """Flush and stop the writer thread; also called when a run ends by an exception, so
        no event is written into the run directory after `cadence.train` returned or raised."""
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def _without_tensorflow() -> None:
    """TensorBoard imports TensorFlow for its file I/O when TensorFlow is installed (cadence's
    ``[tensorflow]`` extra installs it), which costs seconds and puts TensorFlow in the
    training process beside torch. Its own switch, a ``tensorboard.compat.notf`` module, makes
    it use the built-in stub, which writes the same event files."""
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
