"""Learning-rate schedules as pure functions of training progress.

A :data:`Schedule` maps ``t``, the number of optimizer steps already completed (``t = 0`` for
the first step), to a *multiplier* of the base learning rate. The trainer computes
``lr = base_lr * schedule(t) * plateau.scale * batch_lr_scale`` before every step.

Why pure functions instead of torch's chained, stateful ``LRScheduler`` objects:

* a schedule's whole checkpoint is the step counter, so resuming can never drift;
* schedules compose by ordinary function composition (:func:`warmup`, :func:`join`), and a
  loss-driven :class:`~cadence.schedules.plateau.Plateau` multiplier composes on top;
* a schedule can be evaluated at any ``t``, in any order, for plotting or for tests.

Every builder returns a small frozen dataclass with ``__call__``: immutable like a closure, but
with a readable ``repr`` and picklable (for worker processes).

Each builder matches its torch counterpart step by step (see the tests): ``step`` is
``StepLR``, ``multistep`` is ``MultiStepLR``, ``exponential`` is ``ExponentialLR``, ``linear`` is
``LinearLR``, ``cosine`` is ``CosineAnnealingLR`` (for ``t <= total``), ``polynomial`` is
``PolynomialLR`` and ``onecycle`` is ``OneCycleLR`` divided by ``max_lr``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "SCHEDULES",
    "Schedule",
    "build_schedule",
    "constant",
    "cosine",
    "exponential",
    "inverse_sqrt",
    "join",
    "linear",
    "multistep",
    "onecycle",
    "polynomial",
    "step",
    "warmup",
    "wsd",
]

Schedule = Callable[[int], float]
"""Steps completed so far -> multiplier of the base learning rate."""

SCHEDULES: dict[str, str] = {
    "constant": "the base learning rate throughout",
    "exponential": "multiply by gamma every `every` steps (every = steps per epoch for per-epoch)",
    "step": "multiply by gamma every step_size steps (torch StepLR)",
    "multistep": "multiply by gamma at each milestone step (torch MultiStepLR)",
    "linear": "linear decay from the base lr to min_lr_ratio over training (torch LinearLR)",
    "cosine": "half-cosine decay to min_lr_ratio over training (torch CosineAnnealingLR)",
    "polynomial": "(1 - progress)**power decay to min_lr_ratio (torch PolynomialLR)",
    "inverse-sqrt": "flat for `timescale` steps, then 1/sqrt(step) decay (Transformer / T5 style)",
    "onecycle": "ramp from lr/25 to lr over pct_start, then anneal to lr/25e4 (torch OneCycleLR)",
    "wsd": "warmup-stable-decay: flat, then cool down over the last decay_fraction of training",
}

_COOLDOWNS = ("linear", "1-sqrt", "cosine")


# --------------------------------------------------------------------------- validation helpers


def _fail(key: str, message: str) -> ValueError:
    return ValueError(f"{key}: {message}")


def _is_int(x: object) -> bool:
    # bool is an int subclass, but `True` as a step count is always a config mistake.
    return isinstance(x, int) and not isinstance(x, bool)


def _positive_int(x: object, key: str) -> int:
    if not _is_int(x) or x < 1:  # type: ignore[operator]
        raise _fail(key, f"must be a positive integer, got {x!r}")
    return int(x)  # type: ignore[arg-type]


def _finite(x: object, key: str) -> float:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _fail(key, f"must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise _fail(key, f"must be finite, got {x!r}")
    return v


def _in_closed(x: object, lo: float, hi: float, key: str) -> float:
    v = _finite(x, key)
    if not lo <= v <= hi:
        raise _fail(key, f"must be in [{lo:g}, {hi:g}], got {x!r}")
    return v


def _gamma(x: object) -> float:
    v = _finite(x, "schedule.gamma")
    if not 0.0 < v <= 1.0:
        raise _fail("schedule.gamma", f"must be in (0, 1], got {x!r}")
    return v


def _check_t(t: int) -> None:
    # Cheap guard: a negative step is always a caller bug, and several formulas
    # (gamma ** (t // n), the warmup ramp) would silently return values > 1 for it.
    if t < 0:
        raise ValueError(f"schedule: step t must be >= 0, got {t}")


# --------------------------------------------------------------------------- schedule bodies


@dataclass(frozen=True)
class _Constant:
    def __call__(self, t: int) -> float:
        _check_t(t)
        return 1.0


@dataclass(frozen=True)
class _Exponential:
    gamma: float
    every: int

    def __call__(self, t: int) -> float:
        _check_t(t)
        return self.gamma ** (t // self.every)


@dataclass(frozen=True)
class _MultiStep:
    milestones: tuple[int, ...]
    gamma: float

    def __call__(self, t: int) -> float:
        _check_t(t)
        passed = sum(1 for m in self.milestones if m <= t)
        return self.gamma**passed


@dataclass(frozen=True)
class _Linear:
    total: int
    start_factor: float
    end_factor: float

    def __call__(self, t: int) -> float:
        _check_t(t)
        frac = min(t, self.total) / self.total
        return self.start_factor + (self.end_factor - self.start_factor) * frac


@dataclass(frozen=True)
class _Cosine:
    total: int
    min_ratio: float

    def __call__(self, t: int) -> float:
        _check_t(t)
        frac = min(t, self.total) / self.total
        return self.min_ratio + (1.0 - self.min_ratio) * (1.0 + math.cos(math.pi * frac)) / 2.0


@dataclass(frozen=True)
class _Polynomial:
    total: int
    power: float
    min_ratio: float

    def __call__(self, t: int) -> float:
        _check_t(t)
        frac = min(t, self.total) / self.total
        return self.min_ratio + (1.0 - self.min_ratio) * (1.0 - frac) ** self.power


@dataclass(frozen=True)
class _InverseSqrt:
    timescale: float

    def __call__(self, t: int) -> float:
        _check_t(t)
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
        _check_t(t)
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
        _check_t(t)
        if t < self.decay_start or self.decay_steps == 0:
            return 1.0
        p = min(1.0, (t - self.decay_start) / self.decay_steps)
        m = self.min_ratio
        if self.cooldown == "linear":
            return 1.0 - (1.0 - m) * p
        if self.cooldown == "1-sqrt":
            return m + (1.0 - m) * (1.0 - math.sqrt(p))
        return m + (1.0 - m) * (1.0 + math.cos(math.pi * p)) / 2.0


@dataclass(frozen=True)
class _Warmup:
    inner: Schedule
    steps: int

    def __call__(self, t: int) -> float:
        _check_t(t)
        if t < self.steps:
            return (t + 1) / self.steps
        return float(self.inner(t - self.steps))


@dataclass(frozen=True)
class _Join:
    schedules: tuple[Schedule, ...]
    boundaries: tuple[int, ...]

    def __call__(self, t: int) -> float:
        _check_t(t)
        idx, offset = 0, 0
        for i, b in enumerate(self.boundaries):
            if t >= b:
                idx, offset = i + 1, b
            else:
                break
        return float(self.schedules[idx](t - offset))


# --------------------------------------------------------------------------- public builders


def constant() -> Schedule:
    """The base LR throughout; the right body when a Plateau or a batch ramp drives the LR."""
    return _Constant()


def exponential(gamma: float, every: int = 1) -> Schedule:
    """``gamma ** (t // every)``.

    ``every`` exists so that per-epoch decay (torch's ``ExponentialLR`` stepped once an epoch)
    stays a pure function of the optimizer step: pass the number of steps per epoch.
    """
    return _Exponential(_gamma(gamma), _positive_int(every, "schedule.every"))


def step(step_size: int, gamma: float) -> Schedule:
    """``gamma ** (t // step_size)``: the classic staircase, identical to torch ``StepLR``."""
    return _Exponential(_gamma(gamma), _positive_int(step_size, "schedule.step_size"))


def _milestones(milestones: Sequence[int]) -> tuple[int, ...]:
    ms = tuple(milestones)
    for m in ms:
        if not _is_int(m) or m < 0:
            raise _fail("schedule.milestones", f"must be non-negative integers, got {list(ms)}")
    if any(b <= a for a, b in zip(ms, ms[1:])):
        raise _fail("schedule.milestones", f"must be strictly increasing, got {list(ms)}")
    return ms


def multistep(milestones: Sequence[int], gamma: float) -> Schedule:
    """``gamma ** (number of milestones <= t)``, identical to torch ``MultiStepLR``.

    Milestones must be strictly increasing: torch silently multiplies repeated milestones, which
    is almost always a typo in a config rather than an intent.
    """
    return _MultiStep(_milestones(milestones), _gamma(gamma))


def linear(total: int, start_factor: float = 1.0, end_factor: float = 0.0) -> Schedule:
    """Straight line from ``start_factor`` to ``end_factor`` over ``total`` steps, then flat.

    Same values as torch ``LinearLR(total_iters=total)``; it also serves as the decay leg of
    many recipes (set ``start_factor=1`` and ``end_factor`` to the floor).
    """
    total = _positive_int(total, "schedule.total")
    s = _in_closed(start_factor, 0.0, 1.0, "schedule.start_factor")
    e = _in_closed(end_factor, 0.0, 1.0, "schedule.end_factor")
    return _Linear(total, s, e)


def cosine(total: int, min_ratio: float = 0.0) -> Schedule:
    """Half-cosine from 1 to ``min_ratio`` over ``total`` steps, then held at ``min_ratio``.

    Matches torch ``CosineAnnealingLR(T_max=total, eta_min=min_ratio * base)`` up to ``total``;
    torch then climbs back up (it is periodic), which is never what a finite run wants.
    """
    total = _positive_int(total, "schedule.total")
    return _Cosine(total, _in_closed(min_ratio, 0.0, 1.0, "schedule.min_lr_ratio"))


def polynomial(total: int, power: float = 1.0, min_ratio: float = 0.0) -> Schedule:
    """``min_ratio + (1 - min_ratio) * (1 - t/total) ** power``, flat after ``total``.

    With ``min_ratio=0`` this is torch ``PolynomialLR(total_iters=total, power=power)``; the
    floor is added because decaying all the way to 0 wastes the last steps of a run.
    """
    total = _positive_int(total, "schedule.total")
    p = _finite(power, "schedule.power")
    if p <= 0:
        raise _fail("schedule.power", f"must be > 0, got {power!r}")
    return _Polynomial(total, p, _in_closed(min_ratio, 0.0, 1.0, "schedule.min_lr_ratio"))


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
    ts = _finite(timescale, "schedule.timescale")
    if ts < 1:
        raise _fail("schedule.timescale", f"must be >= 1, got {timescale!r}")
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
    total = _positive_int(total, "schedule.total")
    pct = _in_closed(pct_start, 0.0, 1.0, "schedule.pct_start")
    div = _finite(div_factor, "schedule.div_factor")
    if div < 1.0:
        raise _fail("schedule.div_factor", f"must be >= 1, got {div_factor!r}")
    fdiv = _finite(final_div_factor, "schedule.final_div_factor")
    if fdiv <= 0.0:
        raise _fail("schedule.final_div_factor", f"must be > 0, got {final_div_factor!r}")
    if anneal not in ("cos", "linear"):
        raise _fail("schedule.anneal", f"must be 'cos' or 'linear', got {anneal!r}")
    return _OneCycle(total, pct, div, fdiv, anneal)


def wsd(
    total: int,
    decay_fraction: float = 0.2,
    cooldown: str = "linear",
    min_ratio: float = 0.0,
) -> Schedule:
    """Warmup-stable-decay body: 1.0, then a cooldown over the last ``decay_fraction`` of ``total``.

    The cooldown starts at ``total - round(decay_fraction * total)`` and reaches ``min_ratio`` at
    ``t = total``. Because the schedule is a pure function of ``(t, total)``, extending a run
    (a larger ``total``) moves the cooldown to the new end instead of leaving a decayed LR in the
    middle of training — the point of WSD. ``"1-sqrt"`` keeps the LR higher for longer than
    ``"linear"`` and is the shape Hägele et al. (2024) found to match cosine.
    """
    total = _positive_int(total, "schedule.total")
    frac = _in_closed(decay_fraction, 0.0, 1.0, "schedule.decay_fraction")
    if cooldown not in _COOLDOWNS:
        raise _fail(
            "schedule.cooldown", f"must be one of {', '.join(_COOLDOWNS)}; got {cooldown!r}"
        )
    m = _in_closed(min_ratio, 0.0, 1.0, "schedule.min_lr_ratio")
    decay_steps = round(frac * total)
    return _WSD(total, total - decay_steps, decay_steps, cooldown, m)


def warmup(schedule: Schedule, warmup_steps: int) -> Schedule:
    """Linear ramp ``(t + 1) / w`` for ``t < w``, then ``schedule(t - w)``.

    The ramp starts at ``1/w`` rather than 0 so that no step is wasted at LR 0, and it reaches
    exactly 1 on its last step. The inner schedule is *shifted*, so it sees its own t = 0 right
    after warmup: build it with ``total = total_steps - w`` (``build_schedule`` does). An inner
    schedule that does not start at 1 (onecycle) will jump at the seam.
    """
    return _with_warmup(schedule, warmup_steps)


def _with_warmup(schedule: Schedule, warmup_steps: int) -> Schedule:
    # Separate from `warmup` because build_schedule's `warmup` argument shadows that name.
    if not _is_int(warmup_steps) or warmup_steps < 0:
        raise _fail("schedule.warmup", f"must be a non-negative integer, got {warmup_steps!r}")
    if warmup_steps == 0:
        return schedule
    return _Warmup(schedule, warmup_steps)


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Piecewise schedule, as ``optax.join_schedules``.

    For ``t >= boundaries[i]`` (the last such ``i``) the value is
    ``schedules[i + 1](t - boundaries[i])``; before the first boundary it is ``schedules[0](t)``.
    Each piece therefore sees its own clock starting at 0, so pieces built for a standalone run
    can be stitched together without re-deriving their parameters.
    """
    scheds = tuple(schedules)
    bounds = tuple(boundaries)
    if len(scheds) != len(bounds) + 1:
        raise _fail(
            "schedule.boundaries",
            f"need exactly one more schedule than boundaries, got {len(scheds)} schedules "
            f"and {len(bounds)} boundaries",
        )
    for b in bounds:
        if not _is_int(b) or b < 0:
            raise _fail("schedule.boundaries", f"must be non-negative integers, got {list(bounds)}")
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise _fail("schedule.boundaries", f"must be strictly increasing, got {list(bounds)}")
    if not scheds or not all(callable(s) for s in scheds):
        raise _fail("schedule.join", "every piece must be a callable schedule")
    return _Join(scheds, bounds)


def build_schedule(
    name: str,
    *,
    total_steps: int,
    warmup: int = 0,
    gamma: float = 0.1,
    step_size: int | None = None,
    milestones: Sequence[int] = (),
    min_lr_ratio: float = 0.0,
    decay_fraction: float = 0.2,
    cooldown: str = "linear",
    power: float = 1.0,
    every: int = 1,
    timescale: float | None = None,
    pct_start: float = 0.3,
) -> Schedule:
    """Build the named schedule from config values, with ``warmup`` linear steps in front.

    The body runs on its own clock that starts after warmup and spans
    ``total_steps - warmup`` steps, so horizon-based bodies (cosine, linear, polynomial, wsd,
    onecycle) end exactly at ``total_steps``. Step-count parameters (``step_size``,
    ``milestones``, ``every``, ``timescale``) are likewise counted from the end of warmup.

    Defaults: ``step_size=None`` means ``max(1, total_steps // 3)`` (three decays per run, as in
    the config docs); ``timescale=None`` means ``max(warmup, 1)`` (see :func:`inverse_sqrt`).
    ``linear`` decays to ``min_lr_ratio``; ``onecycle`` ignores ``min_lr_ratio`` (its floor is set
    by torch's ``div_factor`` / ``final_div_factor`` defaults). ``multistep`` needs at least one
    milestone. Underscores in ``name`` are accepted for dashes (``inverse_sqrt``).

    Raises:
        ValueError: the message starts with the offending config key, e.g. ``schedule.gamma``.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in SCHEDULES:
        raise _fail(
            "schedule.name", f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}"
        )
    total_steps = _positive_int(total_steps, "train.max_steps")
    if not _is_int(warmup) or not 0 <= warmup < total_steps:
        raise _fail("schedule.warmup", f"must be an integer in [0, {total_steps}), got {warmup!r}")
    # Validate the shared keys even when the chosen body ignores them: a bad value in a config
    # is a bug whichever schedule happens to be selected today.
    gamma = _gamma(gamma)
    min_lr_ratio = _in_closed(min_lr_ratio, 0.0, 1.0, "schedule.min_lr_ratio")
    decay_fraction = _in_closed(decay_fraction, 0.0, 1.0, "schedule.decay_fraction")
    if cooldown not in _COOLDOWNS:
        raise _fail(
            "schedule.cooldown", f"must be one of {', '.join(_COOLDOWNS)}; got {cooldown!r}"
        )
    ms = _milestones(milestones)

    body_total = total_steps - warmup
    body: Schedule
    if key == "constant":
        body = constant()
    elif key == "exponential":
        body = exponential(gamma, every)
    elif key == "step":
        size = max(1, total_steps // 3) if step_size is None else step_size
        body = step(size, gamma)
    elif key == "multistep":
        if not ms:
            raise _fail("schedule.milestones", "multistep needs at least one milestone, got []")
        body = multistep(ms, gamma)
    elif key == "linear":
        body = linear(body_total, 1.0, min_lr_ratio)
    elif key == "cosine":
        body = cosine(body_total, min_lr_ratio)
    elif key == "polynomial":
        body = polynomial(body_total, power, min_lr_ratio)
    elif key == "inverse-sqrt":
        body = inverse_sqrt(max(warmup, 1) if timescale is None else timescale)
    elif key == "onecycle":
        body = onecycle(body_total, pct_start)
    else:  # wsd
        body = wsd(body_total, decay_fraction, cooldown, min_lr_ratio)
    return _with_warmup(body, warmup)
