"""Schedule combinators: a linear warmup in front of a schedule, and piecewise joins."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cadence.schedules.checks import Schedule, check_t, fail, is_int

__all__ = ["join", "warmup"]


@dataclass(frozen=True)
class _Warmup:
    inner: Schedule
    steps: int

    def __call__(self, t: int) -> float:
        check_t(t)
        if t < self.steps:
            return (t + 1) / self.steps
        return float(self.inner(t - self.steps))


@dataclass(frozen=True)
class _Join:
    schedules: tuple[Schedule, ...]
    boundaries: tuple[int, ...]

    def __call__(self, t: int) -> float:
        check_t(t)
        idx, offset = 0, 0
        for i, b in enumerate(self.boundaries):
            if t >= b:
                idx, offset = i + 1, b
            else:
                break
        return float(self.schedules[idx](t - offset))


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
    if not is_int(warmup_steps) or warmup_steps < 0:
        raise fail("schedule.warmup", f"must be a non-negative integer, got {warmup_steps!r}")
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
        raise fail(
            "schedule.boundaries",
            f"need exactly one more schedule than boundaries, got {len(scheds)} schedules "
            f"and {len(bounds)} boundaries",
        )
    for b in bounds:
        if not is_int(b) or b < 0:
            raise fail("schedule.boundaries", f"must be non-negative integers, got {list(bounds)}")
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise fail("schedule.boundaries", f"must be strictly increasing, got {list(bounds)}")
    if not scheds or not all(callable(s) for s in scheds):
        raise fail("schedule.join", "every piece must be a callable schedule")
    return _Join(scheds, bounds)
