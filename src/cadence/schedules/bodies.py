"""Schedule bodies: small frozen dataclasses with ``__call__``, and their public builders.

See :mod:`cadence.schedules.lr` for why schedules are pure functions of the step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cadence.schedules.checks import (
    COOLDOWNS,
    Schedule,
    check_gamma,
    check_milestones,
    check_t,
    fail,
    finite,
    in_closed,
    is_int,
    positive_int,
)

__all__ = [
    "constant",
    "cosine",
    "exponential",
    "inverse_sqrt",
    "linear",
    "multistep",
    "onecycle",
    "polynomial",
    "step",
    "wsd",
]


@dataclass(frozen=True)
class _Constant:
    def __call__(self, t: int) -> float:
        check_t(t)
        return 1.0


@dataclass(frozen=True)
class _Exponential:
    gamma: float
    every: int

    def __call__(self, t: int) -> float:
        check_t(t)
        return self.gamma ** (t // self.every)


@dataclass(frozen=True)
class _MultiStep:
    milestones: tuple[int, ...]
    gamma: float

    def __call__(self, t: int) -> float:
        check_t(t)
        passed = sum(1 for m in self.milestones if m <= t)
        return self.gamma**passed


@dataclass(frozen=True)
class _Linear:
    total: int
    start_factor: float
    end_factor: float

    def __call__(self, t: int) -> float:
        check_t(t)
        frac = min(t, self.total) / self.total
        return self.start_factor + (self.end_factor - self.start_factor) * frac


@dataclass(frozen=True)
class _Cosine:
    total: int
    min_ratio: float

    def __call__(self, t: int) -> float:
        check_t(t)
        frac = min(t, self.total) / self.total
        return self.min_ratio + (1.0 - self.min_ratio) * (1.0 + math.cos(math.pi * frac)) / 2.0


@dataclass(frozen=True)
class _Polynomial:
    total: int
    power: float
    min_ratio: float

    def __call__(self, t: int) -> float:
        check_t(t)
        frac = min(t, self.total) / self.total
        return self.min_ratio + (1.0 - self.min_ratio) * (1.0 - frac) ** self.power


@dataclass(frozen=True)
class _InverseSqrt:
    timescale: float

    def __call__(self, t: int) -> float:
        check_t(t)
        return math.sqrt(self.timescale / max(t + 1, self.timescale))


@dataclass(frozen=True)
class _OneCycle:
    total: int
    pct_start: float
    div_factor: float
    final_div_factor: float
    anneal: str

    def _interp(self, start: float, end: float, pct: float) -> float:
        if self.anneal == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)
        return start + (end - start) * pct

    def __call__(self, t: int) -> float:
        check_t(t)
        initial = 1.0 / self.div_factor
        final = initial / self.final_div_factor
        # Torch refuses to step past total_steps; we hold the last step's value instead.
        t = min(t, self.total - 1)
        # Same phase boundaries as torch (three_phase=False): the ramp ends at the (possibly
        # fractional) step pct_start * total - 1, the anneal ends at step total - 1.
        ramp_end = float(self.pct_start * self.total) - 1.0
        last = float(self.total - 1)
        if t <= ramp_end:
            if ramp_end <= 0.0:  # torch divides 0 by 0 here; the ramp is already complete
                return 1.0
            return self._interp(initial, 1.0, t / ramp_end)
        return self._interp(1.0, final, (t - ramp_end) / (last - ramp_end))


@dataclass(frozen=True)
class _WSD:
    total: int
    decay_start: int
    decay_steps: int
    cooldown: str
    min_ratio: float

    def __call__(self, t: int) -> float:
        check_t(t)
        if t < self.decay_start or self.decay_steps == 0:
            return 1.0
        p = min(1.0, (t - self.decay_start) / self.decay_steps)
        m = self.min_ratio
        if self.cooldown == "linear":
            return 1.0 - (1.0 - m) * p
        if self.cooldown == "1-sqrt":
            return m + (1.0 - m) * (1.0 - math.sqrt(p))
        return m + (1.0 - m) * (1.0 + math.cos(math.pi * p)) / 2.0


# --------------------------------------------------------------------------- public builders


def constant() -> Schedule:
    """The base LR throughout; the right body when a Plateau or a batch ramp drives the LR."""
    return _Constant()


def exponential(gamma: float, every: int = 1) -> Schedule:
    """``gamma ** (t // every)``.

    ``every`` exists so that per-epoch decay (torch's ``ExponentialLR`` stepped once an epoch)
    stays a pure function of the optimizer step: pass the number of steps per epoch.
    """
    return _Exponential(check_gamma(gamma), positive_int(every, "schedule.every"))


def step(step_size: int, gamma: float) -> Schedule:
    """``gamma ** (t // step_size)``: the classic staircase, identical to torch ``StepLR``."""
    return _Exponential(check_gamma(gamma), positive_int(step_size, "schedule.step_size"))


def multistep(milestones: Sequence[int], gamma: float) -> Schedule:
    """``gamma ** (number of milestones <= t)``, identical to torch ``MultiStepLR``.

    Milestones must be strictly increasing: torch silently multiplies repeated milestones, which
    is almost always a typo in a config rather than an intent.
    """
    return _MultiStep(check_milestones(milestones), check_gamma(gamma))


def linear(total: int, start_factor: float = 1.0, end_factor: float = 0.0) -> Schedule:
    """Straight line from ``start_factor`` to ``end_factor`` over ``total`` steps, then flat.

    Same values as torch ``LinearLR(total_iters=total)``; it also serves as the decay leg of
    many recipes (set ``start_factor=1`` and ``end_factor`` to the floor).
    """
    total = positive_int(total, "schedule.total")
    s = in_closed(start_factor, 0.0, 1.0, "schedule.start_factor")
    e = in_closed(end_factor, 0.0, 1.0, "schedule.end_factor")
    return _Linear(total, s, e)


def cosine(total: int, min_ratio: float = 0.0) -> Schedule:
    """Half-cosine from 1 to ``min_ratio`` over ``total`` steps, then held at ``min_ratio``.

    Matches torch ``CosineAnnealingLR(T_max=total, eta_min=min_ratio * base)`` up to ``total``;
    torch then climbs back up (it is periodic), which is never what a finite run wants.
    """
    total = positive_int(total, "schedule.total")
    return _Cosine(total, in_closed(min_ratio, 0.0, 1.0, "schedule.min_lr_ratio"))


def polynomial(total: int, power: float = 1.0, min_ratio: float = 0.0) -> Schedule:
    """``min_ratio + (1 - min_ratio) * (1 - t/total) ** power``, flat after ``total``.

    With ``min_ratio=0`` this is torch ``PolynomialLR(total_iters=total, power=power)``; the
    floor is added because decaying all the way to 0 wastes the last steps of a run.
    """
    total = positive_int(total, "schedule.total")
    p = finite(power, "schedule.power")
    if p <= 0:
        raise fail("schedule.power", f"must be > 0, got {power!r}")
    return _Polynomial(total, p, in_closed(min_ratio, 0.0, 1.0, "schedule.min_lr_ratio"))


def inverse_sqrt(timescale: float) -> Schedule:
    """``sqrt(timescale / max(t + 1, timescale))``: flat for ``timescale`` steps, then 1/sqrt.

    This is the "reciprocal square root" family of the Transformer / T5 papers. It has no
    horizon, so it is the schedule of choice when the length of a run is not known in advance
    (pair it with a wsd-style cooldown via :func:`join` to finish). The flat part keeps the
    multiplier <= 1 so the base LR stays the peak; the decay is continuous at ``t + 1 =
    timescale``. Behind a warmup of ``w`` steps with ``timescale = w`` the LR holds the peak for
    another ``w`` steps and then decays as ``sqrt(w / (t - w + 1))``, which approaches the Noam
    schedule's ``sqrt(w / t)`` as training goes on.
    """
    ts = finite(timescale, "schedule.timescale")
    if ts < 1:
        raise fail("schedule.timescale", f"must be >= 1, got {timescale!r}")
    return _InverseSqrt(ts)


def onecycle(
    total: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal: str = "cos",
) -> Schedule:
    """Smith's 1cycle policy as a multiplier of the *peak* LR (the base LR is the peak).

    Equal to ``OneCycleLR(max_lr=base, total_steps=total, three_phase=False).lr / base`` at every
    step: it starts at ``1/div_factor``, reaches 1 at step ``pct_start * total - 1`` and ends at
    ``1/(div_factor * final_div_factor)`` at step ``total - 1``; later steps hold that value
    (torch raises instead). Because it carries its own ramp, a separate warmup is rarely needed.
    """
    total = positive_int(total, "schedule.total")
    pct = in_closed(pct_start, 0.0, 1.0, "schedule.pct_start")
    div = finite(div_factor, "schedule.div_factor")
    if div < 1.0:
        raise fail("schedule.div_factor", f"must be >= 1, got {div_factor!r}")
    fdiv = finite(final_div_factor, "schedule.final_div_factor")
    if fdiv <= 0.0:
        raise fail("schedule.final_div_factor", f"must be > 0, got {final_div_factor!r}")
    if anneal not in ("cos", "linear"):
        raise fail("schedule.anneal", f"must be 'cos' or 'linear', got {anneal!r}")
    return _OneCycle(total, pct, div, fdiv, anneal)


def wsd(
    total: int,
    decay_fraction: float = 0.2,
    cooldown: str = "linear",
    min_ratio: float = 0.0,
    decay_steps: int | None = None,
) -> Schedule:
    """Warmup-stable-decay body: 1.0, then a cooldown over the last ``decay_fraction`` of ``total``
    (or the last ``decay_steps`` steps, when given: what a cooldown branch off a stable run needs).

    The cooldown starts at ``total - round(decay_fraction * total)`` and reaches ``min_ratio`` at
    ``t = total``. Because the schedule is a pure function of ``(t, total)``, extending a run
    (a larger ``total``) moves the cooldown to the new end instead of leaving a decayed LR in the
    middle of training — the point of WSD. ``"1-sqrt"`` keeps the LR higher for longer than
    ``"linear"`` and is the shape Hägele et al. (2024) found to match cosine.
    """
    total = positive_int(total, "schedule.total")
    frac = in_closed(decay_fraction, 0.0, 1.0, "schedule.decay_fraction")
    if cooldown not in COOLDOWNS:
        raise fail("schedule.cooldown", f"must be one of {', '.join(COOLDOWNS)}; got {cooldown!r}")
    m = in_closed(min_ratio, 0.0, 1.0, "schedule.min_lr_ratio")
    if decay_steps is None:
        decay_steps = round(frac * total)
    elif not is_int(decay_steps) or not 0 <= decay_steps <= total:
        raise fail(
            "schedule.decay_steps",
            f"must be an integer in [0, {total}] (the steps after warmup), got {decay_steps!r}",
        )
    return _WSD(total, total - decay_steps, decay_steps, cooldown, m)
