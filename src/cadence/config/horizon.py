"""The run's horizon: the optimizer step at which the first of its budgets ends.

Every schedule that spans the run is laid out over the horizon: the LR's decay, warmups,
step sizes and milestones given as fractions, momentum, weight-decay and sequence-length points,
LAWA's cadence and the stages of a batch ramp. A user may give the budget as steps
(``train.max_steps``, also the default horizon), samples (``train.max_samples``) or tokens
(``train.max_tokens``); laying the schedules out over ``train.max_steps`` while the run ends on
its token budget would leave a 10 % warmup unfinished when the run stops, without a word.

Turning samples or tokens into steps needs what every step consumes: the global batch, in
samples (``full``: the training set), times the tokens a sample trains. A staged batch ramp and
a sequence-length warmup place their changes at fractions of the horizon itself, so the
conversion is a fixed point: the horizon is the smallest ``H`` for which a run whose ramp (and
sequence lengths) are laid out over ``H`` steps has spent its budget after ``H`` steps. For a
ramp that never shrinks the spend after ``H`` steps only grows with ``H`` (a later stage start
moves steps to smaller batches, but a longer horizon adds a step at the largest), so a binary
search finds it, and such a run spends less than its budget before step ``H``; any other ramp is
checked step for step and refused if no horizon ends exactly on its budget.

Time (``train.max_time_s``) cannot be turned into steps before the run. When it is set, the
schedules read :meth:`Horizon.position`: the larger of the step and the step that the share of
the time budget already spent is of the horizon, so a WSD cooldown starts at its fraction of the
time budget if time runs out first, and a run that stays ahead of its time budget is
step-for-step the run it always was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cadence.config.schema import ConfigError
from cadence.schedules import AutoBatchRamp, BatchRamp
from cadence.schedules.seq_len import SeqLenSchedule, seq_len_schedule

if TYPE_CHECKING:
    from cadence.config.schema import Config

__all__ = ["Horizon", "batch_ramp_over", "horizon", "seq_len_over"]

STEPS, SAMPLES, TOKENS, TIME = (
    "train.max_steps",
    "train.max_samples",
    "train.max_tokens",
    "train.max_time_s",
)


@dataclass(frozen=True)
class Horizon:
    steps: int  # the step at which the first budget ends: every schedule's total
    budget: str  # the key of that budget (a tie goes to the one the stop rules check first)
    # every budget set: (key, value, the step it ends at by itself; None: later than
    # train.max_steps, or not counted, or time)
    given: tuple[tuple[str, float, int | None], ...] = ()
    pending: tuple[str, ...] = ()  # budgets that need the workload to count (config check only)
    time_s: float | None = None  # train.max_time_s: the schedules follow it if it ends first

    @property
    def exact(self) -> bool:
        """Whether every budget was counted (False only where the workload was not known)."""
        return not self.pending

    def position(self, step: int, elapsed_s: float = 0.0) -> int:
        """The step the schedules read after ``step`` steps and ``elapsed_s`` seconds.

        Without a time budget it is the step. With one it is the step, or the same share of the
        horizon as ``elapsed_s`` is of the time budget when that is further along (never past
        the horizon): the schedules then run on time, not on steps.
        """
        if self.time_s is None:
            return step
        share = min(1.0, max(0.0, elapsed_s / self.time_s))
        return max(step, math.floor(share * self.steps))

    def describe(self) -> str:
        """One line: the horizon and which budget it is, the other budgets and the time rule."""
        parts = [f"{k}={_num(v)}" for k, v, _ in self.given if k == self.budget]
        for key, value, end in self.given:
            if key not in (self.budget, TIME):
                when = "at the same step" if end == self.steps else "later"
                parts.append(f"{key}={_num(value)} would end {when}")
        if len(parts) > 1:
            parts[0] += " ends first"
        line = f"horizon: step {self.steps} ({'; '.join(parts)})"
        if self.time_s is not None:
            line += (
                f"; {TIME}={_num(self.time_s)}: if time runs out first the schedules follow the "
                "elapsed share of it"
            )
        return line

    def summary(self) -> dict[str, int | str]:
        """What summary.json records of it."""
        return {"horizon_steps": self.steps, "horizon_budget": self.budget}


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def batch_ramp_over(cfg: Config, n_train: int, steps: int) -> BatchRamp:
    """The global batch of every step for a run of ``steps`` steps (``full``: the training
    set at every step, no ramp)."""
    b = cfg.batch
    base = n_train if b.size == "full" else int(b.size)
    if b.schedule == "auto":
        top = b.max_size if b.max_size is not None else 8 * base
        return AutoBatchRamp(base, top, total_steps=steps, rule=b.lr_scaling)
    if b.max_size is not None:
        raise ValueError(
            "batch.max_size: bounds batch.schedule: auto; remove it or set batch.schedule: auto"
        )
    # The stages go in as written: BatchRamp checks their shape and values itself.
    return BatchRamp(base, b.schedule, total_steps=steps, rule=b.lr_scaling)  # type: ignore[arg-type]


def seq_len_over(cfg: Config, steps: int) -> SeqLenSchedule | None:
    """`schedule.seq_len` for a language model whose samples are `model.seq_len` tokens."""
    s = cfg.schedule
    if s.seq_len is None:
        return None
    if cfg.workload != "lm":
        raise ValueError(
            f"schedule.seq_len: sequence-length warmup is for language models (workload lm), "
            f"not {cfg.workload!r}; remove schedule.seq_len"
        )
    return seq_len_schedule(
        s.seq_len, full=cfg.model.seq_len, keep=s.seq_len_batch, total_steps=steps
    )


def _config_tokens_per_sample(cfg: Config) -> int | None:
    """Tokens per sample as far as the config knows: cadence's language models cut samples of
    ``model.seq_len`` tokens, the other built-in workloads have none, a workload of the user's
    own (``module:function``) says so itself once built (None: not known here)."""
    if ":" in cfg.workload:
        return None
    return cfg.model.seq_len if cfg.workload == "lm" else 0


def horizon(
    cfg: Config, n_train: int | None = None, tokens_per_sample: int | None = None
) -> Horizon:
    """The run's horizon: the first step at which one of its budgets is spent.

    ``n_train`` (the training samples) matters for ``batch.size: full`` and
    ``tokens_per_sample`` for a token budget; the trainer passes its workload's. Left out, they
    are what the config knows, and a budget that cannot be counted without them is left out of
    the horizon and named in ``pending`` (the config check then sees an upper bound).

    Raises ConfigError for a budget that cannot be a horizon: tokens of a workload without
    tokens, samples or tokens under ``batch.schedule: auto`` (it decides the batch as it runs),
    a ramp that no horizon ends exactly on.
    """
    t = cfg.train
    tokens = _config_tokens_per_sample(cfg) if tokens_per_sample is None else tokens_per_sample
    ends: dict[str, int] = {STEPS: t.max_steps}
    pending: list[str] = []
    spends: dict[str, tuple[int, Callable[[int, int], int]]] = {}
    for key, budget in ((SAMPLES, t.max_samples), (TOKENS, t.max_tokens)):
        if budget is None:
            continue
        if budget <= 0:  # (the config check's own rule, needed here first)
            raise ConfigError(f"{key}: must be > 0 or null, got {budget}")
        per_sample = 1 if key == SAMPLES else tokens
        if key == TOKENS and per_sample == 0:
            raise ConfigError(
                f"{TOKENS}: workload {cfg.workload!r} trains on samples without tokens, so a "
                f"token budget never ends; give it as {SAMPLES} or {STEPS}"
            )
        if cfg.batch.schedule == "auto":
            raise ConfigError(
                f"{key}: batch.schedule: auto decides the batch as the run goes, so a budget in "
                f"{key.removeprefix('train.max_')} has no step to lay the schedules out to; "
                f"give the budget as {STEPS}, or the ramp as stages [[fraction, size], ...]"
            )
        if per_sample is None or (cfg.batch.size == "full" and n_train is None):
            pending.append(key)
            continue
        spend = _spender(cfg, n_train or 1, per_sample if key == TOKENS else None)
        spends[key] = (budget, spend)
        end = _first_horizon(spend, budget, t.max_steps)
        if end is not None:
            ends[key] = end
    values = {STEPS: t.max_steps, SAMPLES: t.max_samples, TOKENS: t.max_tokens, TIME: t.max_time_s}
    given = tuple((k, v, ends.get(k)) for k, v in values.items() if v is not None)
    # min() keeps the first of equals: max_steps, then samples, then tokens, as the stop rules
    # check them, so the budget named is the stop reason the run will give.
    budget = min(ends, key=ends.__getitem__)
    steps = ends[budget]
    for key, (amount, spend) in spends.items():
        if spend(steps, steps - 1) >= amount:
            what = "batch.schedule" if cfg.batch.schedule else "schedule.seq_len"
            raise ConfigError(
                f"{what}: with {key}={amount} the run would stop before step {steps}, where "
                f"its stages (fractions of the run) say it ends; use stages that never shrink "
                f"the batch or the sequences, or give the budget as {STEPS}"
            )
    return Horizon(steps, budget, given, tuple(pending), t.max_time_s)


def _spender(cfg: Config, n_train: int, tokens: int | None) -> Callable[[int, int], int]:
    """``spend(total, steps)``: what the first ``steps`` steps of a run laid out over ``total``
    steps consume, in samples (``tokens`` None) or in tokens. Sums stretches of equal steps
    (between ramp stages, and sequence lengths, which are monotone between their points), so
    it costs a few evaluations per stage and length, not one per step."""

    def spend(total: int, steps: int) -> int:
        ramp = batch_ramp_over(cfg, n_train, total)
        seq = seq_len_over(cfg, total) if tokens is not None else None
        cuts = {0, steps, *(s for s in ramp.stage_starts if 0 < s < steps)}
        if seq is not None:
            cuts.update(p for p in seq.points.steps if 0 < p < steps)
        bounds = sorted(cuts)
        spent = 0
        for a, b in zip(bounds, bounds[1:], strict=False):
            size, at = ramp.size_at(a), a
            while at < b:
                if seq is None:
                    spent += (b - at) * size * (tokens or 1)
                    break
                end = _run_end(seq.length_at, at, b)
                spent += (end - at) * size * seq.tokens_per_sample_at(at)
                at = end
        return spent

    return spend


def _run_end(value: Callable[[int], int], start: int, stop: int) -> int:
    """The first step in (start, stop) where a monotone ``value`` differs from its value at
    ``start`` (``stop`` if none)."""
    lo, hi, v = start + 1, stop, value(start)
    while lo < hi:
        mid = (lo + hi) // 2
        if value(mid) == v:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _first_horizon(spend: Callable[[int, int], int], budget: int, limit: int) -> int | None:
    """The smallest horizon H <= limit whose first H steps spend the budget (None: none does,
    the budget ends after ``limit``)."""
    if spend(limit, limit) < budget:
        return None
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        if spend(mid, mid) >= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo
