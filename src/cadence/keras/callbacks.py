"""cadence's momentum, weight-decay and plateau schedules as Keras callbacks.

The values are cadence's pure functions (``cadence.schedules.hparams``) and its ``Plateau``;
how a compiled train step comes to read them is :mod:`cadence.keras.live`'s concern.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import keras

from cadence.keras.live import Slot, require_live, slot
from cadence.keras.lr import CadenceSchedule, check_total
from cadence.schedules import Plateau, Schedule
from cadence.schedules.hparams import piecewise_linear

if TYPE_CHECKING:
    from cadence.config import Config

__all__ = ["HyperparamCallback", "PlateauCallback", "callbacks_from_config"]

Points = Sequence[Sequence[float]]


def _step(model: keras.Model) -> int:
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def _points(value: Points | Schedule, total: int | None, key: str, **bounds: Any) -> Schedule:
    if callable(value):
        return value
    if total is None:
        raise ValueError(f"total_steps: needed to place the {key} points on the run")
    return piecewise_linear(value, check_total(total), key, **bounds)


class HyperparamCallback(keras.callbacks.Callback):
    """Momentum (``momentum`` of SGD / RMSprop, ``beta_1`` of the Adam family and Lion) and
    weight decay set before every step from cadence's piecewise-linear schedules.

    ``momentum`` and ``weight_decay`` take cadence's points ``[[position, value], ...]``
    (a position is a step, or a fraction of ``total_steps`` as a float) or a built schedule;
    weight decay is a multiple of the optimizer's own ``weight_decay``, or ``"lr"`` to follow
    the multiplier of the optimizer's :class:`CadenceSchedule` (times its plateau scale), as
    ``schedule.weight_decay`` does in a cadence run. SGD and RMSprop keep a momentum buffer only
    when built with a nonzero momentum: construct them with one. On an eager backend a scheduled
    momentum of exactly 0 makes Keras' SGD skip its buffer for that step (Keras' own branch).
    """

    def __init__(
        self,
        *,
        momentum: Points | Schedule | None = None,
        weight_decay: Points | Schedule | Literal["lr"] | None = None,
        total_steps: int | None = None,
    ) -> None:
        super().__init__()
        if momentum is None and weight_decay is None:
            raise ValueError("momentum, weight_decay: give at least one schedule")
        self.momentum = (
            None
            if momentum is None
            else _points(momentum, total_steps, "momentum", low=0.0, high=1.0, high_open=True)
        )
        self.weight_decay: Schedule | Literal["lr"] | None = (
            weight_decay
            if weight_decay is None or weight_decay == "lr"
            else _points(weight_decay, total_steps, "weight_decay", low=0.0, high=math.inf)
        )
        self.values: dict[str, float] = {}  # what the last step was given

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model, opt = self.model, self.model.optimizer
        require_live(model, "HyperparamCallback")
        if not opt.built:  # SGD decides on its momentum buffers when it is built
            opt.build(model.trainable_variables)
        self._momentum: Slot | None = None
        self._weight_decay: Slot | None = None
        if self.momentum is not None:
            attr = next((a for a in ("momentum", "beta_1") if hasattr(opt, a)), None)
            if attr is None:
                raise ValueError(f"momentum: {type(opt).__name__} has no momentum or beta_1")
            if attr == "momentum" and float(opt.momentum) == 0:
                raise ValueError(
                    f"momentum: {type(opt).__name__}(momentum=0.0) keeps no momentum buffer; "
                    "construct it with a nonzero momentum (this callback sets its value)"
                )
            self._momentum = slot(model, attr)
        if self.weight_decay is not None:
            if not getattr(opt, "weight_decay", None):
                raise ValueError(
                    f"weight_decay: scales the optimizer's weight_decay, which is "
                    f"{getattr(opt, 'weight_decay', None)}; construct it with the peak value"
                )
            if self.weight_decay == "lr" and not isinstance(opt._learning_rate, CadenceSchedule):
                raise ValueError("weight_decay: 'lr' follows a cadence.keras schedule as the LR")
            self._weight_decay = slot(model, "weight_decay")

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        t = _step(self.model)
        if self._momentum is not None and self.momentum is not None:
            self.values["momentum"] = self.momentum(t)
            self._momentum.set(self.values["momentum"])
        if self._weight_decay is not None:
            if self.weight_decay == "lr":
                lr = self.model.optimizer._learning_rate
                factor = lr.multiplier(t) * lr.scale
            else:
                factor = self.weight_decay(t)  # type: ignore[operator]
            self.values["weight_decay"] = self._weight_decay.base * factor
            self._weight_decay.set(self.values["weight_decay"])


class PlateauCallback(keras.callbacks.Callback):
    """cadence's loss-driven LR reduction: at each epoch end with ``monitor`` in the logs, a
    :class:`~cadence.schedules.Plateau` decides, and its scale multiplies the LR.

    With a :class:`CadenceSchedule` as the LR the scale composes with the schedule (cadence's
    ``lr = peak * schedule(t) * plateau.scale``), unlike Keras' ``ReduceLROnPlateau``, which
    cannot change a scheduled LR; with a fixed LR it scales that. ``settings`` are ``Plateau``'s
    (``factor``, ``patience``, ``threshold``, ``cooldown``, ``min_scale``, ``mode``, ...);
    ``monitor="train_loss"`` reads the epoch's mean training loss (``loss``).
    """

    def __init__(
        self, monitor: str = "val_loss", plateau: Plateau | None = None, **settings: Any
    ) -> None:
        super().__init__()
        if plateau is not None and settings:
            raise ValueError("plateau: give a Plateau or its settings, not both")
        self.plateau = plateau if plateau is not None else Plateau(**settings)
        self.monitor = "loss" if monitor == "train_loss" else monitor
        self._base_lr: float | None = None
        self._seen = 0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        lr = self.model.optimizer._learning_rate
        self._seen = 0
        if isinstance(lr, CadenceSchedule):
            require_live(self.model, "PlateauCallback")
        elif isinstance(lr, keras.optimizers.schedules.LearningRateSchedule) or callable(lr):
            raise ValueError(
                f"learning_rate: {type(lr).__name__} cannot be scaled; give the optimizer a "
                "cadence.keras schedule or a fixed learning rate"
            )
        elif self._base_lr is None:
            self._base_lr = float(self.model.optimizer.learning_rate)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None or logs.get(self.monitor) is None:
            return  # no evaluation this epoch (validation_freq): patience counts evaluations
        self._seen += 1
        self.plateau.update(float(logs[self.monitor]))
        lr = self.model.optimizer._learning_rate
        if isinstance(lr, CadenceSchedule):
            lr.scale = self.plateau.scale
        else:
            self.model.optimizer.learning_rate = self._base_lr * self.plateau.scale
        logs["plateau_scale"] = self.plateau.scale

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._seen == 0:
            warnings.warn(
                f"PlateauCallback: {self.monitor!r} was in no epoch's logs, so the LR was never "
                "adjusted (validation_data missing?)",
                stacklevel=2,
            )


def callbacks_from_config(cfg: Config, total_steps: int | None = None) -> list[Any]:
    """The callbacks a cadence config asks for (``schedule.momentum``,
    ``schedule.weight_decay``, ``plateau.enabled``), built by the trainer's entry points;
    ``total_steps`` defaults to the config's horizon. Imports the config package, hence torch."""
    from cadence.config.horizon import horizon
    from cadence.config.parts import hparam_schedules_from, plateau_from

    total = check_total(horizon(cfg).steps if total_steps is None else total_steps)
    found: list[Any] = []
    hs = hparam_schedules_from(cfg, total)
    if hs.active:
        found.append(HyperparamCallback(momentum=hs.momentum, weight_decay=hs.weight_decay))
    if cfg.plateau.enabled:
        found.append(PlateauCallback(cfg.plateau.monitor, plateau=plateau_from(cfg)))
    return found
