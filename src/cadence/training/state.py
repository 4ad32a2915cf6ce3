"""Counters and records of a run: everything the loop decides with, as one explicit state."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
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
    # elapsed_s as every process agreed at the last completed step: under train.max_time_s the
    # schedules follow it (Horizon.position), so it is checkpointed like the step
    clock_s: float = 0.0
    # The same three on the process's CPU clock: what a run costs however busy the machine is
    # (a contended process waits, and waiting is not CPU time), so compare ranks by these.
    cpu_s: float = 0.0
    eval_cpu_s: float = 0.0
    checkpoint_cpu_s: float = 0.0
    train_cpu_s: float = 0.0
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
    # train.on_spike: the recent training losses a spike is judged against, and the spikes
    recent_losses: list[float] = field(default_factory=list)
    spikes: list[dict[str, Any]] = field(default_factory=list)
    # Samples per forward/backward pass on each process when batch.micro_size is unset and the
    # run went on with fewer processes than wrote its checkpoint (an elastic job that lost a
    # node): each one's share of the largest batch then, so a process accumulates over several
    # passes instead of needing more memory than it had. Kept once set (None: no limit).
    pass_size: int | None = None
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
    """Keeps the wall and CPU times of a TrainState current, across resumes.

    Time-to-target and throughput count training only: how often a run evaluates or
    checkpoints (and how costly its evaluation is: EMA, schedule-free swaps) is not its speed,
    so `train_time_s` is elapsed time minus evaluation and checkpoint time, and `train_cpu_s`
    the same on the CPU clock (`time.process_time`: every thread of this process, none of its
    neighbours'; with one torch thread a run's CPU time barely moves when other processes
    share the cores, while its wall time grows with them).
    """

    def __init__(self, state: TrainState) -> None:
        self.state = state
        self._start: float | None = None  # perf_counter() when fit() started
        self._cpu_start = 0.0  # process_time() at that moment
        self._base = 0.0  # elapsed_s restored from a checkpoint at that moment
        self._cpu_base = 0.0  # cpu_s restored likewise

    def start(self) -> None:
        self._base = self.state.elapsed_s
        self._cpu_base = self.state.cpu_s
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def now(self) -> float:
        """Elapsed seconds of the run as of this instant (outside fit(): as recorded)."""
        if self._start is None:
            return self.state.elapsed_s
        return self._base + (time.perf_counter() - self._start)

    def cpu_now(self) -> float:
        """CPU seconds of the run as of this instant (outside fit(): as recorded)."""
        if self._start is None:
            return self.state.cpu_s
        return self._cpu_base + (time.process_time() - self._cpu_start)

    def tick(self) -> None:
        """After a completed step: bring elapsed and training time up to now."""
        st = self.state
        st.elapsed_s = self.now()
        st.train_time_s = st.elapsed_s - st.eval_time_s - st.checkpoint_time_s
        st.cpu_s = self.cpu_now()
        st.train_cpu_s = st.cpu_s - st.eval_cpu_s - st.checkpoint_cpu_s

    @contextlib.contextmanager
    def excluded(self, kind: str) -> Iterator[None]:
        """Time spent in the block is not training: ``kind`` is "eval" or "checkpoint"."""
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            st = self.state
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if kind == "eval":
                st.eval_time_s += wall
                st.eval_cpu_s += cpu
            else:
                st.checkpoint_time_s += wall
                st.checkpoint_cpu_s += cpu
            st.elapsed_s = self.now()
            st.cpu_s = self.cpu_now()
