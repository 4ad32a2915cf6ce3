"""Batch-size ramps and micro-batch splitting.

Growing the batch during training plays the role of decaying the LR (Smith et al., 2018, "Don't
decay the learning rate, increase the batch size") while using hardware better late in a run.
Like the LR schedules, a :class:`BatchRamp` is a pure function of the optimizer step, so a
resumed run picks the right batch size from the step counter alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "BATCH_SCHEDULES",
    "LR_SCALING_RULES",
    "AutoBatchRamp",
    "BatchRamp",
    "lr_exponent",
    "split_micro",
]

BATCH_SCHEDULES: dict[str, str] = {
    "batch.schedule": "batch-size ramp in stages: [[fraction, size], ...]; the LR follows by "
    "(B/B0)^alpha, batch.lr_scaling: sqrt | linear | none | alpha",
    "batch.schedule: auto": "the batch doubles when the measured critical batch (gradient "
    "noise scale) reaches twice it, up to batch.max_size; the LR follows as above",
}

# the named rules and the exponent each stands for: lr ∝ (B / B0) ** alpha
LR_SCALING_RULES: dict[str, float] = {"sqrt": 0.5, "linear": 1.0, "none": 0.0}


def lr_exponent(rule: str | float) -> float:
    """The exponent alpha of ``lr ∝ (B / B0) ** alpha`` a ``batch.lr_scaling`` value means.

    A number is taken as is, in [0, 2]: modded-nanogpt's batch-size schedule used 0.5-0.6,
    Goyal et al.'s SGD rule is 1, Adam's square-root rule 0.5; beyond 2 no published rule goes.
    """
    if isinstance(rule, str):
        if rule not in LR_SCALING_RULES:
            raise ValueError(
                f"batch.lr_scaling: must be a number in [0, 2] or one of "
                f"{', '.join(LR_SCALING_RULES)}; got {rule!r}"
            )
        return LR_SCALING_RULES[rule]
    if isinstance(rule, bool) or not isinstance(rule, (int, float)) or not 0.0 <= rule <= 2.0:
        raise ValueError(
            f"batch.lr_scaling: an exponent must be a number in [0, 2] (0.5 = sqrt, "
            f"1 = linear); got {rule!r}"
        )
    return float(rule)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class BatchRamp:
    """Global batch size as a step function of training progress, plus the matching LR factor.

    ``stages`` is ``[(fraction_of_training, global_batch_size), ...]``; stage ``i`` takes effect
    at the first step ``t >= fraction_i * total_steps``. Before the first stage the batch is
    ``base_size``. (The product is rounded to 9 decimals before taking the ceiling so that e.g.
    ``0.3 * 10`` starts at step 3, not 4, despite binary floating point.)

    ``rule`` says how the LR follows the batch, ``(size/base) ** alpha``: a number alpha, or
    ``"sqrt"`` (0.5, the rule that keeps the gradient-noise scale fixed for Adam-type
    optimizers), ``"linear"`` (1, Goyal et al.'s rule for SGD) or ``"none"`` (0).
    """

    def __init__(
        self,
        base_size: int,
        stages: Sequence[tuple[float, int]] = (),
        *,
        total_steps: int,
        rule: str | float = "sqrt",
    ) -> None:
        if not _is_int(base_size) or base_size < 1:
            raise ValueError(f"batch.size: must be a positive integer, got {base_size!r}")
        if not _is_int(total_steps) or total_steps < 1:
            raise ValueError(f"train.max_steps: must be a positive integer, got {total_steps!r}")
        self.alpha = lr_exponent(rule)
        parsed: list[tuple[float, int]] = []
        for i, stage in enumerate(stages):
            try:
                frac, size = stage
            except (TypeError, ValueError):
                raise ValueError(
                    f"batch.schedule[{i}]: expected [fraction, size], got {stage!r}"
                ) from None
            if not (
                isinstance(frac, (int, float)) and not isinstance(frac, bool) and 0.0 <= frac < 1.0
            ):
                raise ValueError(f"batch.schedule[{i}]: fraction must be in [0, 1), got {frac!r}")
            # Sizes arrive from YAML lists of floats (e.g. [0.5, 64.0]); accept integral floats.
            if isinstance(size, float) and size.is_integer():
                size = int(size)
            if not _is_int(size) or size < 1:
                raise ValueError(
                    f"batch.schedule[{i}]: size must be a positive integer, got {size!r}"
                )
            if parsed and frac <= parsed[-1][0]:
                raise ValueError(
                    f"batch.schedule: fractions must be strictly increasing, "
                    f"got {[f for f, _ in parsed] + [frac]}"
                )
            parsed.append((float(frac), size))
        self.base_size = base_size
        self.total_steps = total_steps
        self.rule = rule
        self.stages: tuple[tuple[float, int], ...] = tuple(parsed)
        self.stage_starts: tuple[int, ...] = tuple(
            math.ceil(round(f * total_steps, 9)) for f, _ in parsed
        )

    def size_at(self, t: int) -> int:
        """Global batch size for the step with ``t`` optimizer steps already completed."""
        size = self.base_size
        for start, (_, stage_size) in zip(self.stage_starts, self.stages):
            if t >= start:
                size = stage_size
            else:
                break
        return size

    def lr_scale_at(self, t: int) -> float:
        """LR multiplier that compensates for the batch at step ``t`` being larger than base."""
        ratio = self.size_at(t) / self.base_size
        # the named exponents exactly as their closed forms (pow is not correctly rounded)
        if self.alpha == 0.0:
            return 1.0
        if self.alpha == 0.5:
            return math.sqrt(ratio)
        if self.alpha == 1.0:
            return ratio
        return ratio**self.alpha

    @property
    def max_size(self) -> int:
        """Largest global batch of the run (what memory and data loaders must be sized for)."""
        return max([self.base_size, *(s for _, s in self.stages)])

    def __repr__(self) -> str:
        return (
            f"BatchRamp(base_size={self.base_size}, stages={list(self.stages)}, "
            f"total_steps={self.total_steps}, rule={self.rule!r})"
        )


class AutoBatchRamp(BatchRamp):
    """A batch ramp decided during the run by the measured gradient noise scale
    (``batch.schedule: auto``).

    McCandlish et al. (2018): training is most efficient near the critical batch size, which is
    about the noise scale ``B_noise``, and ``B_noise`` grows as the loss falls. So the batch starts
    at ``batch.size`` and, each time a measurement says the critical batch is at least twice the
    current one, doubles (up to ``max_size``); it never shrinks. One doubling per measurement at
    most, so one noisy estimate cannot throw the batch far, and powers of two of the base keep
    the sizes a data loader and accumulation like. The LR follows by ``(B / B0) ** alpha`` as for
    a staged ramp.

    The decisions ``[(step, size), ...]`` are the ramp's whole state: ``size_at`` reads them like
    a staged ramp's stages, and they are checkpointed with the run (by the callback that makes
    them), so a resumed run continues with the batch it had.
    """

    def __init__(
        self, base_size: int, max_size: int, *, total_steps: int, rule: str | float = "sqrt"
    ) -> None:
        super().__init__(base_size, (), total_steps=total_steps, rule=rule)
        if not _is_int(max_size) or max_size < base_size:
            raise ValueError(
                f"batch.max_size: must be an integer >= batch.size={base_size}, got {max_size!r}"
            )
        self.ceiling = max_size
        self.decisions: list[tuple[int, int]] = []

    def size_at(self, t: int) -> int:
        size = self.base_size
        for step, new in self.decisions:
            if t < step:
                break
            size = new
        return size

    @property
    def max_size(self) -> int:
        return self.ceiling

    def propose(self, step: int, noise_scale: float) -> int | None:
        """The size to grow to after ``step`` given the critical batch estimate, or None."""
        current = self.size_at(step)
        bigger = min(2 * current, self.ceiling)
        if bigger > current and math.isfinite(noise_scale) and noise_scale >= bigger:
            return bigger
        return None

    def grow(self, step: int, size: int) -> None:
        if size <= self.size_at(step):
            raise ValueError(f"batch ramp: {size} at step {step} does not grow the batch")
        self.decisions = [d for d in self.decisions if d[0] < step] + [(step, size)]

    def __repr__(self) -> str:
        return (
            f"AutoBatchRamp(base_size={self.base_size}, max_size={self.ceiling}, "
            f"decisions={self.decisions}, rule={self.rule!r})"
        )


def split_micro(global_size: int, micro_size: int | None) -> list[int]:
    """Sizes of the micro-batches whose accumulated gradients make one global batch.

    All are ``micro_size`` except possibly a smaller last one; the trainer must weight each
    micro-batch's loss by ``size / global_size`` so the accumulated gradient is the mean over
    the global batch, whatever the split.
    """
    if not _is_int(global_size) or global_size < 1:
        raise ValueError(f"batch.size: must be a positive integer, got {global_size!r}")
    if micro_size is None:
        return [global_size]
    if not _is_int(micro_size) or micro_size < 1:
        raise ValueError(
            f"batch.micro_size: must be a positive integer or null, got {micro_size!r}"
        )
    if micro_size >= global_size:
        return [global_size]
    full, rest = divmod(global_size, micro_size)
    return [micro_size] * full + ([rest] if rest else [])
