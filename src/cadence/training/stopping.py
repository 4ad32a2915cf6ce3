"""Why a run stops, as a typed value, and the stopping rules as plain functions.

Each rule is a pure function of numbers a loop already has, so a user's own loop can call them
(``budget_reached(cfg.train, step=..., ...)``, ``target_reached(...)``); the Trainer calls the
same functions. A stop reason is a :class:`StopReason` (a kind, and the step or signal that
goes with it), not a string to be parsed: the CLI's exit codes, the trainer and ``compare``
all branch on ``reason.kind``. ``str(reason)`` is the text summaries have always shown
(``max_steps``, ``interrupted (SIGTERM)``, ``nonfinite at step 7``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cadence.config import TrainConfig
    from cadence.training.state import TrainState
    from cadence.training.step import StepRead
    from cadence.training.trainer import Trainer


class StopKind(str, enum.Enum):
    MAX_STEPS = "max_steps"
    MAX_SAMPLES = "max_samples"
    MAX_TOKENS = "max_tokens"
    MAX_TIME = "max_time"
    TARGET = "target"
    EARLY_STOP = "early_stop"
    CONVERGED_GRAD_NORM = "converged_grad_norm"
    CONVERGED_LOSS = "converged_loss"
    INTERRUPTED = "interrupted"  # SIGTERM / SIGINT: checkpointed, resumable
    NONFINITE = "nonfinite"  # a NaN/inf loss or gradient the policy could not get past
    PRIVACY_BUDGET = "privacy_budget"  # privacy.max_epsilon: the next step would spend more
    SPIKE = "spike"  # train.on_spike skipped or rolled back too many loss spikes in a row


@dataclass(frozen=True)
class StopReason:
    kind: StopKind
    step: int | None = None  # NONFINITE: the step whose loss or gradient was not finite
    detail: str = ""  # INTERRUPTED: the signal; NONFINITE: why the policy gave up

    @property
    def interrupted(self) -> bool:
        return self.kind is StopKind.INTERRUPTED

    @property
    def failed(self) -> bool:
        """The run could not continue (exit status 1), as opposed to ending by its rules."""
        return self.kind in (StopKind.NONFINITE, StopKind.SPIKE)

    def __str__(self) -> str:
        if self.kind is StopKind.INTERRUPTED:
            return f"interrupted ({self.detail})"
        if self.kind is StopKind.NONFINITE:
            return f"nonfinite at step {self.step}" + (f": {self.detail}" if self.detail else "")
        if self.kind is StopKind.SPIKE:
            return f"loss spikes at step {self.step}: {self.detail}"
        return self.kind.value

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "step": self.step, "detail": self.detail}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StopReason:
        return cls(StopKind(data["kind"]), data.get("step"), data.get("detail", ""))

    @classmethod
    def of_summary(cls, summary: dict[str, Any]) -> StopReason | None:
        """The reason recorded in a run's summary (None if it has none)."""
        stop = summary.get("stop")
        return cls.from_dict(stop) if isinstance(stop, dict) else None


def budget_reached(
    t: TrainConfig, *, step: int, samples: int, tokens: int, elapsed_s: float | None = None
) -> StopReason | None:
    """The first step, sample, token or time budget that is used up (None: keep going).

    Pass ``elapsed_s=None`` to leave time out (under torch.distributed it is agreed separately,
    since each process has its own clock)."""
    if step >= t.max_steps:
        return StopReason(StopKind.MAX_STEPS)
    if t.max_samples is not None and samples >= t.max_samples:
        return StopReason(StopKind.MAX_SAMPLES)
    if t.max_tokens is not None and tokens >= t.max_tokens:
        return StopReason(StopKind.MAX_TOKENS)
    if elapsed_s is not None and time_up(t, elapsed_s):
        return StopReason(StopKind.MAX_TIME)
    return None


def time_up(t: TrainConfig, elapsed_s: float) -> bool:
    return t.max_time_s is not None and elapsed_s >= t.max_time_s


def converged(
    t: TrainConfig, *, grad_norm: float, loss: float, prev_loss: float | None
) -> StopReason | None:
    """``train.tol_grad_norm`` (the gradient norm is small) or ``train.tol_rel_loss`` (the loss
    changed by less than that fraction since the previous step)."""
    if t.tol_grad_norm is not None and grad_norm < t.tol_grad_norm:
        return StopReason(StopKind.CONVERGED_GRAD_NORM)
    tol = t.tol_rel_loss
    if (
        tol is not None
        and prev_loss is not None
        and abs(loss - prev_loss) <= tol * max(abs(prev_loss), 1e-12)
    ):
        return StopReason(StopKind.CONVERGED_LOSS)
    return None


def is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    """Whether an evaluation beats the best so far (the first finite one always does)."""
    if best is None:
        return math.isfinite(value)
    return value > best if higher_is_better else value < best


def target_reached(value: float, target: float | None, higher_is_better: bool) -> bool:
    if target is None:
        return False
    return value >= target if higher_is_better else value <= target


def early_stop_due(evals_since_best: int, patience: int | None) -> bool:
    return patience is not None and evals_since_best >= patience


def stop_after_step(
    t: TrainConfig, st: TrainState, read: StepRead, received: str | None = None
) -> StopReason | None:
    """The first stop a completed step calls for: budgets (time as agreed by the step's read),
    convergence, then a signal (`received`: its name on this process, if it got it). Updates
    ``st.prev_loss`` for the relative-loss criterion."""
    reason = budget_reached(t, step=st.step, samples=st.samples, tokens=st.tokens)
    if reason is None and read.time_up:
        reason = StopReason(StopKind.MAX_TIME)
    if t.tol_grad_norm is not None or t.tol_rel_loss is not None:
        prev, st.prev_loss = st.prev_loss, read.loss
        if reason is None:
            reason = converged(t, grad_norm=read.grad_norm, loss=read.loss, prev_loss=prev)
    if reason is None and read.signal:
        reason = StopReason(StopKind.INTERRUPTED, detail=received or "SIGTERM")
    return reason


class StopDecisions:
    """Mixed into Trainer: the run's stop decisions, each a line of ``fit`` fed by the rules
    above (the first reason given wins)."""

    @property
    def stopping(self: Trainer) -> bool:
        return self.state.stop_reason is not None

    @property
    def interrupted(self: Trainer) -> bool:
        return self.state.stop_reason is not None and self.state.stop_reason.interrupted

    def stop(self: Trainer, reason: StopReason | None) -> None:
        """The first reason given wins; None is ignored."""
        if reason is not None and self.state.stop_reason is None:
            self.state.stop_reason = reason

    def check_budgets(self: Trainer) -> None:
        """Before the first step too: resuming a run that reached its budget trains no more.
        (elapsed_s is restored from the checkpoint, so it is the same on every rank.)"""
        st = self.state
        t = self.cfg.train
        self.stop(
            budget_reached(
                t, step=st.step, samples=st.samples, tokens=st.tokens, elapsed_s=st.elapsed_s
            )
        )
        self.stop(self.privacy_budget_reached())

    def privacy_budget_reached(self: Trainer) -> StopReason | None:
        """privacy.max_epsilon: the run is at the last step whose ε stays within it."""
        last = self.privacy.last_step if self.privacy is not None else None
        if last is not None and self.state.step >= last:
            return StopReason(StopKind.PRIVACY_BUDGET, step=last)
        return None

    def check_stops(self: Trainer, read: StepRead) -> None:
        """Everything that may end the run after a good step, from the step's host read."""
        received = self.signals.received if self.signals is not None else None
        self.stop(stop_after_step(self.cfg.train, self.state, read, received))
        self.stop(self.privacy_budget_reached())
