"""cadence's LR schedules as a Keras ``LearningRateSchedule``: a table read with one gather.

Keras calls ``learning_rate(step)`` with a backend tensor, often inside a compiled graph
(``tf.function``, XLA), where Python cannot branch on the step. Instead of re-deriving each
formula in ``keras.ops`` (a second implementation that could drift from cadence's), the schedule
evaluates cadence's own pure function once at every step of the horizon and the call reads the
table: exact at every step, one gather, the same on every backend. Past the horizon the value of
its last step holds. The table is never saved: ``get_config`` keeps the description (name,
``build_schedule``'s arguments, peak LR, horizon) and ``from_config`` rebuilds it.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from cadence.schedules import Schedule, build_schedule
from cadence.schedules.checks import steps_of

if TYPE_CHECKING:
    from cadence.config import Config

__all__ = ["CadenceSchedule", "schedule", "schedule_from_config"]

# build_schedule's keyword arguments (all but the horizon, which the schedule holds itself).
_PARAMS = tuple(
    p for p in inspect.signature(build_schedule).parameters if p not in ("name", "total_steps")
)


def check_total(total_steps: object) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps: must be a positive integer, got {total_steps!r}")
    return total_steps


def _check_params(params: dict[str, Any]) -> None:
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise ValueError(
            f"{unknown[0]}: not a cadence schedule parameter; choose from {', '.join(_PARAMS)}"
        )


@keras.saving.register_keras_serializable(package="cadence")
class CadenceSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """``peak_lr * cadence_schedule(step) * scale`` for Keras optimizers, on any backend.

    ``params`` are :func:`cadence.schedules.build_schedule`'s keyword arguments in steps
    (``warmup``, ``min_lr_ratio``, ``cooldown``, ...). ``scale`` is the loss-driven factor that
    :class:`~cadence.keras.PlateauCallback` lowers: a variable, so a compiled train step reads
    its current value, and saved with the schedule so a reloaded model resumes at its LR.
    """

    def __init__(
        self,
        schedule: str,
        peak_lr: float,
        total_steps: int,
        params: dict[str, Any] | None = None,
        scale: float = 1.0,
    ) -> None:
        total = check_total(total_steps)
        if isinstance(peak_lr, bool) or not isinstance(peak_lr, (int, float)):
            raise ValueError(f"peak_lr: must be a positive number, got {peak_lr!r}")
        if not (math.isfinite(peak_lr) and peak_lr > 0):
            raise ValueError(f"peak_lr: must be a positive number, got {peak_lr!r}")
        params = dict(params or {})
        _check_params(params)
        self.fn: Schedule = build_schedule(schedule, total_steps=total, **params)
        self.schedule = schedule
        self.peak_lr = float(peak_lr)
        self.total_steps = total
        self.params = params
        values = [self.peak_lr * self.fn(t) for t in range(total + 1)]
        self._table = keras.ops.convert_to_tensor(np.asarray(values, dtype="float32"))
        self._scale = keras.Variable(
            float(scale), dtype="float32", trainable=False, name="cadence_lr_scale"
        )

    def __call__(self, step: Any) -> Any:
        index = keras.ops.minimum(keras.ops.cast(step, "int32"), self.total_steps)
        return keras.ops.take(self._table, index) * self._scale

    def multiplier(self, step: int) -> float:
        """cadence's multiplier at ``step`` as the table holds it (the horizon's past its end),
        without the plateau scale: what ``schedule.weight_decay: lr`` follows."""
        return float(self.fn(min(int(step), self.total_steps)))

    @property
    def scale(self) -> float:
        return float(keras.ops.convert_to_numpy(self._scale))

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale.assign(float(value))

    def get_config(self) -> dict[str, Any]:
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        return {
            "schedule": self.schedule,
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "params": params,
            "scale": self.scale,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return (
            f"CadenceSchedule({self.schedule!r}, peak_lr={self.peak_lr:g}, "
            f"total_steps={self.total_steps}{', ' if args else ''}{args})"
        )


def schedule(
    name: str, *, peak_lr: float, total_steps: int, warmup: int | float = 0, **params: Any
) -> CadenceSchedule:
    """A cadence LR schedule for a Keras optimizer: ``keras.optimizers.AdamW(schedule(...))``.

    ``name`` is one of ``cadence list schedules``; ``total_steps`` the run's horizon in optimizer
    steps (epochs x steps per epoch), over which annealing bodies end. ``warmup``,
    ``step_size`` and ``milestones`` take steps (integers) or fractions of the run, as in a
    cadence config; the other ``params`` are :func:`cadence.schedules.build_schedule`'s
    (``min_lr_ratio``, ``cooldown``, ``gamma``, ``every``, ...).

    Raises:
        ValueError: the message starts with the offending argument.
    """
    total = check_total(total_steps)
    _check_params(params)
    resolved = dict(params, warmup=steps_of(warmup, total, "warmup"))
    if params.get("step_size") is not None:
        resolved["step_size"] = steps_of(params["step_size"], total, "step_size")
    if "milestones" in params:
        resolved["milestones"] = [steps_of(m, total, "milestones") for m in params["milestones"]]
    return CadenceSchedule(name, peak_lr, total, resolved)


def schedule_from_config(
    cfg: Config,
    total_steps: int | None = None,
    *,
    steps_per_epoch: int = 1,
    peak_lr: float | None = None,
) -> CadenceSchedule:
    """The LR schedule a cadence config (``cadence.load_config``, a recipe) trains with.

    Built by the trainer's own entry point (``lr_schedule_from``), and checked against it at
    every step, so the Keras run follows the schedule ``cadence train`` would. ``total_steps``
    defaults to the config's horizon; ``steps_per_epoch`` serves ``schedule.per: epoch``;
    ``peak_lr`` defaults to ``optimizer.lr``. Imports the config package, hence torch.
    """
    from cadence.config.horizon import horizon
    from cadence.config.parts import lr_schedule_from

    total = check_total(horizon(cfg).steps if total_steps is None else total_steps)
    s = cfg.schedule
    if s.warmup == "auto":
        raise ValueError("schedule.warmup: 'auto' is decided by a cadence run; give steps")
    lr = cfg.optimizer.lr if peak_lr is None else peak_lr
    if lr == "auto":
        raise ValueError("optimizer.lr: 'auto' is decided by a cadence run; pass peak_lr")
    params: dict[str, Any] = {
        "warmup": steps_of(s.warmup, total, "schedule.warmup"),
        "gamma": s.gamma,
        "milestones": [steps_of(m, total, "schedule.milestones") for m in s.milestones],
        "min_lr_ratio": s.min_lr_ratio,
        "decay_fraction": s.decay_fraction,
        "decay_steps": s.decay_steps,
        "cooldown": s.cooldown,
        "power": s.power,
        "every": steps_per_epoch if s.per == "epoch" else 1,
        "timescale": s.timescale,
        "pct_start": s.pct_start,
    }
    if s.step_size is not None:
        params["step_size"] = steps_of(s.step_size, total, "schedule.step_size")
    sched = CadenceSchedule(s.name, lr, total, params)
    trainer = lr_schedule_from(cfg, steps_per_epoch, total)
    for t in range(total + 1):
        if sched.fn(t) != trainer(t):
            raise RuntimeError(
                f"cadence.keras: the schedule built from {s.name!r} differs from the trainer's "
                f"at step {t} ({sched.fn(t)} != {trainer(t)}); a schedule key is not mapped here"
            )
    return sched
