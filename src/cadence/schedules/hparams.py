"""Schedules of hyper-parameters besides the LR: momentum (or Adam's beta1) and weight decay.

Speedrun recipes schedule more than the LR: modded-nanogpt warms Muon's momentum up from 0.85
to 0.95 over the first 300 steps and cools it back down at the end, and ties weight decay to the
LR schedule. These are pure functions of the step, like the LR schedules, so the checkpoint of a
run that uses them is still just the step counter and resume stays exact. They compose the
same way (:func:`~cadence.schedules.compose.warmup` and :func:`~cadence.schedules.compose.join`
take them as they take an LR schedule).

A schedule is written as piecewise-linear points ``[[position, value], ...]``: an integer
position is a step, a float in [0, 1] a fraction of the run (1.0 = its end, the run's horizon,
as for the LR schedules, whose horizon is the same), and the value
is held flat before the first point and after the last. Two points at one position make a jump.
Points rather than a named family because the published recipes are exactly this shape (linear
ramps and holds), and because any curve can be approximated by enough of them.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from cadence.schedules.checks import Schedule, check_t, fail, is_int

if TYPE_CHECKING:
    from cadence.optim import AnyOptimizer

__all__ = [
    "HPARAM_SCHEDULES",
    "HyperSchedules",
    "PiecewiseLinear",
    "piecewise_linear",
    "set_momentum",
    "set_weight_decay",
]

HPARAM_SCHEDULES: dict[str, str] = {
    "schedule.momentum": "momentum (sgd, muon, schedulefree-sgd) or beta1 (adam family, lion, "
    "schedulefree-adamw) by step: [[position, value], ...], linear between points",
    "schedule.weight_decay": "weight decay as a multiple of optimizer.weight_decay: "
    "[[position, factor], ...], or 'lr' to follow the LR multiplier",
    "schedule.seq_len": "lm: training sequence length (sequence-length warmup): "
    "[[position, length], ...] up to model.seq_len; schedule.seq_len_batch: tokens keeps the "
    "batch in tokens (more, shorter sequences), sequences keeps it in sequences (tails dropped)",
}


@dataclass(frozen=True)
class PiecewiseLinear:
    """Linear between ``(steps[i], values[i])``, flat outside; the later value wins at a jump."""

    steps: tuple[int, ...]
    values: tuple[float, ...]

    def __call__(self, t: int) -> float:
        check_t(t)
        i = bisect_right(self.steps, t)  # steps[i - 1] <= t < steps[i]
        if i == 0:
            return self.values[0]
        if i == len(self.steps):
            return self.values[-1]
        s0, s1 = self.steps[i - 1], self.steps[i]
        v0, v1 = self.values[i - 1], self.values[i]
        return v0 + (v1 - v0) * (t - s0) / (s1 - s0)


def _position(pos: object, total_steps: int, key: str) -> int:
    if is_int(pos):
        if pos < 0:  # type: ignore[operator]
            raise fail(key, f"a step position must be >= 0, got {pos}")
        return int(pos)  # type: ignore[arg-type]
    if isinstance(pos, float):
        if not 0.0 <= pos <= 1.0:
            raise fail(
                key,
                f"a fraction of the run must be in [0, 1], got {pos}; give a step as an integer",
            )
        # as the LR schedules count it: 1.0 is the end of the run, t = its horizon
        return round(pos * total_steps)
    raise fail(key, f"a position must be a step (integer) or a run fraction, got {pos!r}")


def piecewise_linear(
    points: Sequence[Sequence[Any]],
    total_steps: int,
    key: str,
    *,
    low: float,
    high: float,
    high_open: bool = False,
) -> PiecewiseLinear:
    """Check ``[[position, value], ...]`` and resolve its positions to steps.

    Values must lie in [low, high] (or [low, high) with ``high_open``): momentum 1 never decays
    its buffer, so that end is open for it. Positions must not decrease once resolved.
    """
    if not isinstance(points, Sequence) or isinstance(points, str) or not points:
        raise fail(key, f"expected points [[position, value], ...], got {points!r}")
    steps: list[int] = []
    values: list[float] = []
    for i, point in enumerate(points):
        if not isinstance(point, Sequence) or isinstance(point, str) or len(point) != 2:
            raise fail(key, f"point {i} must be [position, value], got {point!r}")
        pos, value = point
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(key, f"point {i}: the value must be a number, got {value!r}")
        v = float(value)
        above = v >= high if high_open else v > high
        if not math.isfinite(v) or v < low or above:
            bracket = ")" if high_open else "]"
            raise fail(key, f"point {i}: the value must be in [{low:g}, {high:g}{bracket}, got {v}")
        steps.append(_position(pos, total_steps, key))
        values.append(v)
    if any(b < a for a, b in zip(steps, steps[1:])):
        raise fail(key, f"positions must not decrease, got steps {steps}")
    return PiecewiseLinear(tuple(steps), tuple(values))


def set_momentum(optimizer: AnyOptimizer, value: float, where: Literal["momentum", "betas"]) -> int:
    """Write ``value`` into every group that has the optimizer's momentum hyper-parameter.

    ``where`` is the registry's word for it: ``"momentum"`` (SGD, Muon, schedule-free SGD) or
    ``"betas"``, whose first entry is the momentum (Adam's beta1, Lion's interpolation). Muon's
    AdamW half has betas but no momentum key, so it keeps its own beta1, as in modded-nanogpt.
    Returns the number of groups written.
    """
    n = 0
    for group in optimizer.param_groups:
        if where not in group:
            continue
        if where == "momentum":
            group["momentum"] = value
        else:
            group["betas"] = (value, *group["betas"][1:])  # AdEMAMix has a third beta
        n += 1
    return n


def set_weight_decay(optimizer: AnyOptimizer, factor: float) -> None:
    """Each group's weight decay becomes its own base value times ``factor``.

    The base is stamped into the group (``base_weight_decay``) the first time, so groups the
    optimizer exempts (norms, biases: 0) stay at 0, and it travels in the optimizer's state dict,
    so a resumed run multiplies the same base.
    """
    for group in optimizer.param_groups:
        if "weight_decay" not in group:
            continue
        base = group.setdefault("base_weight_decay", group["weight_decay"])
        group["weight_decay"] = base * factor


@dataclass(frozen=True)
class HyperSchedules:
    """The run's non-LR schedules; :meth:`apply` sets them for the step about to be taken."""

    momentum: Schedule | None = None
    momentum_key: Literal["momentum", "betas"] = "momentum"
    weight_decay: Schedule | Literal["lr"] | None = None
    base_weight_decay: float = 0.0

    @property
    def active(self) -> bool:
        return self.momentum is not None or self.weight_decay is not None

    def apply(self, optimizer: AnyOptimizer, step: int, lr_multiplier: float) -> dict[str, float]:
        """Set the step's values; returns them for the metrics row (config-level numbers)."""
        values: dict[str, float] = {}
        if self.momentum is not None:
            m = self.momentum(step)
            set_momentum(optimizer, m, self.momentum_key)
            values["momentum"] = m
        if self.weight_decay is not None:
            factor = lr_multiplier if self.weight_decay == "lr" else self.weight_decay(step)
            set_weight_decay(optimizer, factor)
            values["weight_decay"] = self.base_weight_decay * factor
        return values
