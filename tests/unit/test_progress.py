"""The progress bar's ETA comes from the run's own step rate."""

from __future__ import annotations

import io

from rich.console import Console

from cadence.track.progress import ProgressBar


class _Trainer:
    class state:  # noqa: N801 - mimics Trainer.state
        step = 0


def test_eta_is_remaining_steps_times_seconds_per_step():
    bar = ProgressBar(100, console=Console(file=io.StringIO(), width=120))
    bar.on_start(_Trainer())
    row = {"step": 20, "train_loss": 2.0, "lr": 1e-3, "tokens_per_s": 10.0, "time_s": 10.0}
    bar.on_log(_Trainer(), row)
    # 0.5 s per step, 80 steps left -> 40 s.
    assert bar._eta(row) == "eta 0:00:40"
    assert bar._eta({"step": 100, "time_s": 50.0}) == "eta 0:00:00"
    bar.on_end(_Trainer(), {"steps": 20})
