"""Validation helpers shared by the schedule builders, and the :data:`Schedule` type.

Each schedule rule (what makes a gamma, a step count, a milestone list or a cooldown valid) has
its single home here. Every helper raises :class:`ValueError` whose message starts with the
offending config key, e.g. ``schedule.gamma: must be in (0, 1], got 2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = [
    "COOLDOWNS",
    "Schedule",
    "check_gamma",
    "check_milestones",
    "check_t",
    "fail",
    "finite",
    "in_closed",
    "is_int",
    "positive_int",
    "steps_of",
]

Schedule = Callable[[int], float]
"""Steps completed so far -> multiplier of the base learning rate."""

COOLDOWNS = ("linear", "1-sqrt", "cosine")
"""The ``schedule.cooldown`` shapes of :func:`~cadence.schedules.bodies.wsd`."""


def fail(key: str, message: str) -> ValueError:
    return ValueError(f"{key}: {message}")


def is_int(x: object) -> bool:
    # bool is an int subclass, but `True` as a step count is always a config mistake.
    return isinstance(x, int) and not isinstance(x, bool)


def positive_int(x: object, key: str) -> int:
    if not is_int(x) or x < 1:  # type: ignore[operator]
        raise fail(key, f"must be a positive integer, got {x!r}")
    return int(x)  # type: ignore[arg-type]


def finite(x: object, key: str) -> float:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise fail(key, f"must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise fail(key, f"must be finite, got {x!r}")
    return v


def in_closed(x: object, lo: float, hi: float, key: str) -> float:
    v = finite(x, key)
    if not lo <= v <= hi:
        raise fail(key, f"must be in [{lo:g}, {hi:g}], got {x!r}")
    return v


def check_gamma(x: object) -> float:
    v = finite(x, "schedule.gamma")
    if not 0.0 < v <= 1.0:
        raise fail("schedule.gamma", f"must be in (0, 1], got {x!r}")
    return v


def check_t(t: int) -> None:
    # Cheap guard: a negative step is always a caller bug, and several formulas
    # (gamma ** (t // n), the warmup ramp) would silently return values > 1 for it.
    if t < 0:
        raise ValueError(f"schedule: step t must be >= 0, got {t}")


def check_milestones(milestones: Sequence[int]) -> tuple[int, ...]:
    ms = tuple(milestones)
    for m in ms:
        if not is_int(m) or m < 0:
            raise fail("schedule.milestones", f"must be non-negative integers, got {list(ms)}")
    if any(b <= a for a, b in zip(ms, ms[1:])):
        raise fail("schedule.milestones", f"must be strictly increasing, got {list(ms)}")
    return ms


def steps_of(value: int | float, total: int, key: str) -> int:
    """An integer is a number of steps; a float is a fraction of the run's `total` steps (its
    horizon).

    A fraction rounds to the nearest step and stays below `total`, so ``schedule.warmup: 0.1``
    works for a 20-step smoke run (2 steps) and a 300-step run (30) alike.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}: expected steps (an integer) or a run fraction, got {value!r}")
    if isinstance(value, int):
        return value
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"{key}: a fraction of the run must be in [0, 1), got {value}; "
            "give a number of steps as an integer"
        )
    return max(0, min(round(value * total), total - 1))
