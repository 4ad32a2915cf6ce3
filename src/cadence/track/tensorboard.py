"""TensorBoard event files next to metrics.jsonl, for users who live in TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cadence.training.events import Callback

_SKIP = {"step"}


class TensorBoardLogger(Callback):
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer = None

    def on_start(self, trainer: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def on_log(self, trainer: Any, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key not in _SKIP and isinstance(value, (int, float)):
                group = "val" if key.startswith(("val_", "ema_")) else "train"
                self.writer.add_scalar(f"{group}/{key}", value, row["step"])

    def on_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
