"""A rich progress bar: step, loss, lr, throughput, ETA; refreshed at log intervals only."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from cadence.runtime.events import Callback, TrainerView


class ProgressBar(Callback):
    def __init__(self, total_steps: int, console: Console | None = None) -> None:
        self.total = total_steps
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None
        self.last_val: float | None = None

    def on_start(self, trainer: TrainerView) -> None:
        self.progress = Progress(
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            console=self.console,
        )
        self.progress.start()
        self.start_step = trainer.state.step
        self.task = self.progress.add_task(
            "train", total=self.total, completed=trainer.state.step, info="", eta="eta -:--"
        )

    def on_log(self, trainer: TrainerView, row: dict[str, Any]) -> None:
        rate = (
            f"{row['tokens_per_s']:,.0f} tok/s"
            if "tokens_per_s" in row
            else f"{row['samples_per_s']:,.0f} smp/s"
        )
        info = f"loss {row['train_loss']:.3f} lr {row['lr']:.1e} {rate}"
        if "val_loss" in row:
            self.last_val = row["val_loss"]
        if self.last_val is not None:
            info += f" val {self.last_val:.3f}"
        self.progress.update(self.task, completed=row["step"], info=info, eta=self._eta(row))

    def _eta(self, row: dict[str, Any]) -> str:
        """From the run's own step rate (rich's estimate needs several updates inside 30 s, which
        slow steps and sparse log rows do not give). Budgets other than steps may end it sooner."""
        done = row["step"] - self.start_step
        if done <= 0 or row.get("time_s") is None:
            return "eta -:--"
        per_step = row["time_s"] / max(row["step"], 1)
        left = int(per_step * max(self.total - row["step"], 0))
        return f"eta {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"

    def on_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=summary["steps"])
            self.progress.stop()
            self.progress = None
