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

from collections.abc import Sequence

from cadence.schedules.bodies import (
    constant,
    cosine,
    exponential,
    inverse_sqrt,
    linear,
    multistep,
    onecycle,
    polynomial,
    step,
    wsd,
)
from cadence.schedules.checks import (
    COOLDOWNS,
    Schedule,
    check_gamma,
    check_milestones,
    fail,
    in_closed,
    is_int,
    positive_int,
)
from cadence.schedules.compose import _with_warmup, join, warmup

__all__ = [
    "ANNEALING",
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
    "wsd_cooldown_start",
]

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
    "wsd": "warmup-stable-decay: flat, then cool down over the last decay_fraction of training "
    "(or decay_steps)",
}

# The bodies shaped by the run's horizon: they anneal the LR to the end of the run (build_schedule
# ends them exactly at total_steps). The rest hold or decay by step counts of their own.
ANNEALING = frozenset({"linear", "cosine", "polynomial", "onecycle", "wsd"})


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
    decay_steps: int | None = None,
    cooldown: str = "linear",
    power: float = 1.0,
    every: int = 1,
    timescale: float | None = None,
    pct_start: float = 0.3,
) -> Schedule:
    """Build the named schedule from config values, with ``warmup`` linear steps in front.

    The body runs on its own clock that starts after warmup and spans
    ``total_steps - warmup`` steps, so horizon-based bodies (:data:`ANNEALING`) end exactly at
    ``total_steps``. Step-count parameters (``step_size``,
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
        raise fail(
            "schedule.name", f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}"
        )
    total_steps = positive_int(total_steps, "train.max_steps")
    if not is_int(warmup) or not 0 <= warmup < total_steps:
        raise fail("schedule.warmup", f"must be an integer in [0, {total_steps}), got {warmup!r}")
    # Validate the shared keys even when the chosen body ignores them: a bad value in a config
    # is a bug whichever schedule happens to be selected today.
    gamma = check_gamma(gamma)
    min_lr_ratio = in_closed(min_lr_ratio, 0.0, 1.0, "schedule.min_lr_ratio")
    decay_fraction = in_closed(decay_fraction, 0.0, 1.0, "schedule.decay_fraction")
    if cooldown not in COOLDOWNS:
        raise fail("schedule.cooldown", f"must be one of {', '.join(COOLDOWNS)}; got {cooldown!r}")
    ms = check_milestones(milestones)

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
            raise fail("schedule.milestones", "multistep needs at least one milestone, got []")
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
        body = wsd(body_total, decay_fraction, cooldown, min_lr_ratio, decay_steps)
    return _with_warmup(body, warmup)


def wsd_cooldown_start(
    total_steps: int, warmup: int = 0, decay_fraction: float = 0.2, decay_steps: int | None = None
) -> int:
    """The step at which a warmup-then-WSD run leaves its stable phase.

    Read off the same body :func:`build_schedule` trains with, so what branches off a stable
    phase (``cadence cooldown``) can never disagree with the run about where it ends.
    """
    body = wsd(total_steps - warmup, decay_fraction, decay_steps=decay_steps)
    return warmup + body.decay_start
