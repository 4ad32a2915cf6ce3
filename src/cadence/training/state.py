"""Counters and records of a run: everything the loop decides with, as one explicit state."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from cadence.training.stopping import StopReason


@dataclass
class TrainState:
    """Progress is counted in optimizer steps, samples and tokens; schedules read `step`."""

    step: int = 0  # completed optimizer steps
    samples: int = 0  # training samples consumed (also the data position)
    tokens: int = 0  # training tokens consumed (text workloads)
    elapsed_s: float = 0.0  # wall time of the loop so far, excluding start-up
    eval_time_s: float = 0.0  # part of elapsed_s spent evaluating
    checkpoint_time_s: float = 0.0  # part of elapsed_s spent writing checkpoints
    train_time_s: float = 0.0  # elapsed_s minus the two above, as of the last completed step
    best_metric: float | None = None  # best validation metric so far
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0  # for early stopping
    target_step: int | None = None  # first step at which train.target was reached
    last_train_loss: float | None = None  # last loss read back from the device
    skipped_steps: int = 0  # updates dropped because the loss or gradient was not finite
    consecutive_skips: int = 0  # non-finite steps in a row (a run that only skips is stuck)
    rollbacks: int = 0  # reloads of the last checkpoint after a non-finite step
    lr_scale: float = 1.0  # LR multiplier lowered by each rollback
    prev_loss: float | None = None  # previous step's loss, for the tol_rel_loss criterion
    stop_reason: StopReason | None = None

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        # Plain values only: checkpoints are read back with torch.load(weights_only=True).
        state["stop_reason"] = None if self.stop_reason is None else self.stop_reason.to_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        unknown = set(state) - names
        if unknown:
            raise KeyError(f"unknown train-state keys: {sorted(unknown)}")
        for key, value in state.items():
            setattr(self, key, value)
        if isinstance(self.stop_reason, dict):
            self.stop_reason = StopReason.from_dict(self.stop_reason)


class RunClock:
    """Keeps `elapsed_s` and `train_time_s` of a TrainState current, across resumes.

    Time-to-target and throughput count training only: how often a run evaluates or
    checkpoints (and how costly its evaluation is: EMA, schedule-free swaps) is not its speed,
    so `train_time_s` is elapsed time minus evaluation and checkpoint time.
    """

    def __init__(self, state: TrainState) -> None:
        self.state = state
        self._start: float | None = None  # perf_counter() when fit() started
        self._base = 0.0  # elapsed_s restored from a checkpoint at that moment

    def start(self) -> None:
        self._base = self.state.elapsed_s
        self._start = time.perf_counter()

    def now(self) -> float:
        """Elapsed seconds of the run as of this instant (outside fit(): as recorded)."""
        if self._start is None:
            return self.state.elapsed_s
        return self._base + (time.perf_counter() - self._start)

    def tick(self) -> None:
        """After a completed step: bring elapsed and training time up to now."""
        st = self.state
        st.elapsed_s = self.now()
        st.train_time_s = st.elapsed_s - st.eval_time_s - st.checkpoint_time_s

    def spent(self, *, eval_s: float = 0.0, checkpoint_s: float = 0.0) -> None:
        """Account time that is not training (an evaluation, a checkpoint)."""
        st = self.state
        st.eval_time_s += eval_s
        st.checkpoint_time_s += checkpoint_s
        st.elapsed_s = self.now()
