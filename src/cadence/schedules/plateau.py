"""Loss-driven learning-rate reduction that composes with any schedule.

torch's ``ReduceLROnPlateau`` writes the optimizer's LR directly, so it cannot be combined with
another scheduler: whichever writes last wins. :class:`Plateau` instead owns only a multiplier
``scale`` (starting at 1.0) and the trainer multiplies it in:
``lr = base_lr * schedule(t) * plateau.scale * batch_lr_scale``. The decision rule is torch's,
so ``base_lr * scale`` equals torch's LR for a constant schedule.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["EMASmoother", "Plateau"]

_STATE_KEYS = ("scale", "best", "num_bad", "cooldown_left", "num_updates", "num_reductions")
_HPARAM_KEYS = (
    "factor",
    "patience",
    "threshold",
    "threshold_mode",
    "cooldown",
    "min_scale",
    "mode",
)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class Plateau:
    """Multiply the LR by ``factor`` when the monitored metric stops improving.

    Rule (same as torch ``ReduceLROnPlateau``): an evaluation is *better* when it beats the best
    so far by more than ``threshold`` (relative: ``metric < best * (1 - threshold)``; absolute:
    ``metric < best - threshold``; mirrored for ``mode="max"``). Otherwise it is *bad*. During
    cooldown the bad counter is held at 0. Once more than ``patience`` consecutive evaluations
    are bad, ``scale`` is multiplied by ``factor`` (not below ``min_scale``), the counter is reset
    and a cooldown of ``cooldown`` evaluations starts.

    Unlike torch, a non-finite metric (NaN, +-inf) always counts as bad: a diverged evaluation
    is the strongest possible signal of a plateau, never an improvement. There is no ``eps``:
    a reduction is skipped only when ``scale`` is already at ``min_scale``.
    """

    def __init__(
        self,
        factor: float = 0.5,
        patience: int = 3,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_scale: float = 0.0,
        mode: str = "min",
    ) -> None:
        self._set_hparams(
            factor=factor,
            patience=patience,
            threshold=threshold,
            threshold_mode=threshold_mode,
            cooldown=cooldown,
            min_scale=min_scale,
            mode=mode,
        )
        self.scale: float = 1.0
        self.best: float = math.inf if mode == "min" else -math.inf
        self.num_bad: int = 0
        self.cooldown_left: int = 0
        self.num_updates: int = 0
        self.num_reductions: int = 0

    def _set_hparams(
        self,
        *,
        factor: float,
        patience: int,
        threshold: float,
        threshold_mode: str,
        cooldown: int,
        min_scale: float,
        mode: str,
    ) -> None:
        # Validate everything before assigning anything, so a failed load leaves self intact.
        if not (isinstance(factor, (int, float)) and 0.0 < factor < 1.0):
            raise ValueError(f"plateau.factor: must be in (0, 1), got {factor!r}")
        if not _is_int(patience) or patience < 0:
            raise ValueError(f"plateau.patience: must be an integer >= 0, got {patience!r}")
        if not (
            isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0
        ):
            raise ValueError(f"plateau.threshold: must be a finite number >= 0, got {threshold!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(
                f"plateau.threshold_mode: must be 'rel' or 'abs', got {threshold_mode!r}"
            )
        if not _is_int(cooldown) or cooldown < 0:
            raise ValueError(f"plateau.cooldown: must be an integer >= 0, got {cooldown!r}")
        if not (isinstance(min_scale, (int, float)) and 0.0 <= min_scale <= 1.0):
            raise ValueError(f"plateau.min_scale: must be in [0, 1], got {min_scale!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"plateau.mode: must be 'min' or 'max', got {mode!r}")
        self.factor = float(factor)
        self.patience = int(patience)
        self.threshold = float(threshold)
        self.threshold_mode = threshold_mode
        self.cooldown = int(cooldown)
        self.min_scale = float(min_scale)
        self.mode = mode

    def _is_better(self, metric: float) -> bool:
        best = self.best
        if self.mode == "min":
            if self.threshold_mode == "rel":
                return metric < best * (1.0 - self.threshold)
            return metric < best - self.threshold
        if self.threshold_mode == "rel":
            return metric > best * (1.0 + self.threshold)
        return metric > best + self.threshold

    def update(self, metric: float) -> bool:
        """Record one evaluation; return True when it lowered ``scale``.

        Call it once per evaluation (not per step): ``patience`` and ``cooldown`` count
        evaluations, exactly as torch counts ``ReduceLROnPlateau.step`` calls.
        """
        value = float(metric)
        self.num_updates += 1
        if math.isfinite(value) and self._is_better(value):
            self.best = value
            self.num_bad = 0
        else:
            self.num_bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.num_bad = 0
        if self.num_bad <= self.patience:
            return False
        # Like torch, a plateau resets the counter and starts the cooldown even when the scale is
        # already at its floor, so the timing of later decisions does not depend on the floor.
        self.num_bad = 0
        self.cooldown_left = self.cooldown
        new_scale = max(self.scale * self.factor, self.min_scale)
        if new_scale >= self.scale:
            return False
        self.scale = new_scale
        self.num_reductions += 1
        return True

    @property
    def at_floor(self) -> bool:
        """True once further plateaus cannot lower the LR (a signal to stop early)."""
        return max(self.scale * self.factor, self.min_scale) >= self.scale

    def state_dict(self) -> dict[str, Any]:
        """Counters and hyperparameters under named keys, so checkpoints are self-describing."""
        return {k: getattr(self, k) for k in _STATE_KEYS + _HPARAM_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; hyperparameters are taken from the checkpoint if present.

        Hyperparameters are optional so that a trainer may deliberately resume with a changed
        plateau config by dropping them from the dict; the counters are required.
        """
        missing = [k for k in ("scale", "best", "num_bad", "cooldown_left") if k not in state]
        if missing:
            raise KeyError(f"plateau state is missing {', '.join(missing)}")
        hp = {k: state.get(k, getattr(self, k)) for k in _HPARAM_KEYS}
        self._set_hparams(**hp)
        self.scale = float(state["scale"])
        self.best = float(state["best"])
        self.num_bad = int(state["num_bad"])
        self.cooldown_left = int(state["cooldown_left"])
        self.num_updates = int(state.get("num_updates", 0))
        self.num_reductions = int(state.get("num_reductions", 0))

    def __repr__(self) -> str:
        return (
            f"Plateau(scale={self.scale:g}, best={self.best:g}, num_bad={self.num_bad}, "
            f"cooldown_left={self.cooldown_left}, factor={self.factor:g}, "
            f"patience={self.patience}, mode={self.mode!r})"
        )


class EMASmoother:
    """Bias-corrected exponential moving average of a noisy scalar (the training loss).

    A raw per-step training loss is too noisy for :class:`Plateau`: single bad batches would
    look like plateaus. The bias correction ``1 / (1 - beta**n)`` makes early values unbiased
    instead of being dragged toward the zero initialisation.

    Non-finite inputs are returned as they are but not absorbed into the average: one NaN batch
    should be reported (so a Plateau counts it as bad) without poisoning every later value.
    """

    def __init__(self, beta: float = 0.9) -> None:
        if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"EMASmoother: beta must be in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self._avg = 0.0
        self._count = 0

    @property
    def value(self) -> float:
        """The current smoothed value; NaN before the first finite update."""
        if self._count == 0:
            return math.nan
        return self._avg / (1.0 - self.beta**self._count)

    @property
    def count(self) -> int:
        return self._count

    def update(self, x: float) -> float:
        """Absorb one observation and return the smoothed value."""
        v = float(x)
        if not math.isfinite(v):
            return v
        self._avg = self.beta * self._avg + (1.0 - self.beta) * v
        self._count += 1
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "avg": self._avg, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        beta = float(state.get("beta", self.beta))
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMASmoother: beta must be in [0, 1), got {beta!r}")
        self.beta = beta
        self._avg = float(state["avg"])
        self._count = int(state["count"])
