"""Optimizer hyper-parameters that a compiled Keras train step reads at every step.

Keras optimizers keep momentum, ``beta_1`` and ``weight_decay`` as Python floats, and a compiled
train step (``tf.function``) bakes a float in when it is traced: assigning a new float from a
callback would change what ``get_config`` says and nothing of what the step does. Under the
TensorFlow backend a scheduled attribute therefore becomes a :class:`_Live` value, a float that
Python code (Keras' ``if self.momentum != 0`` branches, saving) reads as the optimizer's
configured value and that arithmetic and tensor conversion read from a variable, so the compiled
step sees every step's value without a retrace. Eager backends (torch) read the attribute at
every step, so there it stays a plain float. JAX's compiled step would bake the variable in:
refused there unless the model runs eagerly.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import keras

__all__ = ["Slot", "require_live", "slot"]


class _Live(float):
    """The optimizer's configured value to Python, a variable's current value to tensors."""

    def __new__(cls, value: float, variable: keras.Variable) -> _Live:
        obj = super().__new__(cls, value)
        obj.variable = variable
        return obj

    def _now(self) -> Any:
        return keras.ops.cast(self.variable, self.variable.dtype)

    def __tf_tensor__(self, dtype: Any = None, name: Any = None) -> Any:
        return keras.ops.cast(self.variable, self.variable.dtype if dtype is None else dtype)

    def __reduce__(self) -> tuple[type, tuple[float]]:  # copies and pickles are plain floats
        return float, (float(self),)

    # Keras' update rules compute with the hyper-parameter (``1 - self.beta_1``).
    def __add__(self, other: Any) -> Any:
        return self._now() + other

    def __radd__(self, other: Any) -> Any:
        return other + self._now()

    def __sub__(self, other: Any) -> Any:
        return self._now() - other

    def __rsub__(self, other: Any) -> Any:
        return other - self._now()

    def __mul__(self, other: Any) -> Any:
        return self._now() * other

    def __rmul__(self, other: Any) -> Any:
        return other * self._now()

    def __truediv__(self, other: Any) -> Any:
        return self._now() / other

    def __rtruediv__(self, other: Any) -> Any:
        return other / self._now()

    def __pow__(self, other: Any) -> Any:  # type: ignore[override]
        return self._now() ** other

    def __rpow__(self, other: Any) -> Any:
        return other ** self._now()

    def __neg__(self) -> Any:
        return -self._now()


@dataclass
class Slot:
    """One scheduled attribute of one optimizer; shared by every fit and callback using it, so
    a train step traced in an earlier fit keeps reading the same variable."""

    optimizer: Any
    attr: str
    base: float  # the optimizer's own value: weight decay is scheduled as a multiple of it
    variable: keras.Variable | None

    def set(self, value: float) -> None:
        if self.variable is not None:
            self.variable.assign(value)
        else:
            setattr(self.optimizer, self.attr, value)


_SLOTS: weakref.WeakKeyDictionary[Any, dict[str, Slot]] = weakref.WeakKeyDictionary()


def slot(model: keras.Model, attr: str) -> Slot:
    """The model's optimizer's ``attr`` made schedulable (once; later calls share it)."""
    optimizer = model.optimizer
    slots = _SLOTS.setdefault(optimizer, {})
    if attr not in slots:
        base = float(getattr(optimizer, attr))
        variable = None
        if keras.backend.backend() == "tensorflow":
            variable = keras.Variable(
                base, dtype="float32", trainable=False, name=f"cadence_{attr}"
            )
            setattr(optimizer, attr, _Live(base, variable))
            model.make_train_function(force=True)  # a step traced earlier baked the float in
        slots[attr] = Slot(optimizer, attr, base, variable)
    return slots[attr]


def require_live(model: keras.Model, what: str) -> None:
    """Refuse where a value set between steps would not reach the compiled step."""
    if keras.backend.backend() == "jax" and not model.run_eagerly:
        raise RuntimeError(
            f"{what}: JAX's compiled step bakes the value in when traced; compile the model "
            "with run_eagerly=True or use the tensorflow or torch backend"
        )
