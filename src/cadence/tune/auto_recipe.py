"""Settings a run decides for itself before training: ``batch.size``, ``optimizer.lr`` and
``schedule.warmup`` set to ``auto``.

The batch comes from a pilot on the user's own model and data, within ``batch.pilot`` (at most
10 %) of the run's budget, which the pilot's samples are taken from:

1. the LR range test at a small batch (:func:`cadence.tune.lr_finder.lr_range_test`), so the
   next step trains at an LR that works (skipped when ``optimizer.lr`` is a number);
2. a few real training steps at that batch and LR, since the gradient noise scale grows as the
   loss falls and one measured at initialisation understates the batch that pays later;
3. the gradient noise scale ``B_simple`` there (:func:`estimate_noise_scale`, McCandlish et al.
   2018): the critical batch, where doubling the batch stops halving the steps;
4. the batch: the critical batch, at least the pilot's own (the noise scale measured early
   only grows), never so large that the budget leaves fewer than :data:`MIN_STEPS` optimizer
   steps (a run of a few steps cannot warm up, decay or average) nor that the pilot's share
   cannot hold a range test at it, in whole micro-batches;
5. the peak LR for that batch: a range test at it, on a ramp a decade either side of the small
   batch's loss-minimum LR, when the pilot's share still holds one; else the small batch's
   peak moved by a scaling rule (square root for Adam-like updates, Malladi et al. 2022;
   McCandlish's ``eps_max / (1 + B_noise / B)`` for SGD). From a range test, an annealed
   schedule's peak is two thirds of the loss minimum's LR, a constant LR the test's cautious
   suggestion (:func:`peak_lr`).

The weights and every random stream are put back after the pilot, so the run starts where it
would have. ``schedule.warmup: auto`` is ``2 / (1 - beta2)`` steps for optimizers with a second
moment (Ma & Yarats 2021: the horizon of its running average, which is what warmup protects),
5 % of the run otherwise, at most 10 % of the run either way. Every decision, with the
measurement behind it, goes to ``auto.json``; config.yaml holds the decided values, so a resumed
run never decides again.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadence.config import ConfigError
from cadence.config.horizon import horizon
from cadence.config.schema import PILOT_BATCH
from cadence.io import atomic_write_json
from cadence.optim import OPTIMIZERS
from cadence.schedules import ANNEALING
from cadence.training.rng import rng_preserved
from cadence.tune.lr_finder import LRFindResult, lr_range_test, write_lr_find
from cadence.tune.noise_scale import estimate_noise_scale, lr_for_batch, train_first

if TYPE_CHECKING:
    from cadence.config import Config
    from cadence.workloads import Workload

__all__ = [
    "MIN_STEPS",
    "PilotPlan",
    "choose_auto",
    "choose_batch",
    "peak_lr",
    "plan_pilot",
    "warmup_rule",
]

MIN_STEPS = 100  # the fewest optimizer steps batch.size: auto leaves the run
PEAK_DIVISOR = 1.5  # an annealed run's peak LR: the range test's loss-minimum LR over this
WARMUP_CAP = 0.1  # schedule.warmup: auto is at most this share of the run
LR_STEPS = (10, 40)  # the pilot's range tests: fewest and most steps
WARM_STEPS = (5, 40)  # training steps before the noise is measured
MEASUREMENTS = (5, 30)  # noise-scale measurements (each one big batch of gradients)


def _clamp(value: float, bounds: tuple[int, int]) -> int:
    return int(min(max(value, bounds[0]), bounds[1]))


@dataclasses.dataclass(frozen=True)
class PilotPlan:
    """How much of the budget each part of the pilot may spend, in samples."""

    budget_samples: int  # the run's budget in samples (tokens / tokens per sample)
    allowance: int  # batch.pilot of it
    batch: int  # the small batch the pilot trains and measures at
    lr_steps: int  # range-test steps at that batch (0: optimizer.lr is given)
    warm_steps: int
    measurements: int  # each spends 2 x batch samples (a big batch of 16 small ones)

    @property
    def planned(self) -> int:
        return (self.lr_steps + self.warm_steps + 2 * self.measurements) * self.batch


def budget_samples(cfg: Config, tokens_per_sample: int) -> int:
    """The budget in training samples: the smaller of train.max_samples and train.max_tokens."""
    t = cfg.train
    limits = [t.max_samples] if t.max_samples is not None else []
    if t.max_tokens is not None and tokens_per_sample > 0:
        limits.append(t.max_tokens // tokens_per_sample)
    return min(limits)


def plan_pilot(cfg: Config, workload: Workload) -> PilotPlan | None:
    """The pilot ``batch.size: auto`` will run (None without it); ConfigError, one line, when
    the budget cannot hold even the smallest one. Cheap: call it before anything is written."""
    if cfg.batch.size != "auto":
        return None
    total = budget_samples(cfg, workload.tokens_per_sample)
    allowance = int(cfg.batch.pilot * total)
    batch = min(cfg.batch.micro_size or PILOT_BATCH, workload.n_train)
    lr_auto = cfg.optimizer.lr == "auto"
    smallest = PilotPlan(
        total, allowance, batch, LR_STEPS[0] if lr_auto else 0, WARM_STEPS[0], MEASUREMENTS[0]
    )
    if total - allowance < _min_steps(cfg) * batch:
        key = "batch.micro_size" if cfg.batch.micro_size else "batch.size"
        warmup = cfg.schedule.warmup
        after = f" (after schedule.warmup={warmup})" if type(warmup) is int else ""
        raise ConfigError(
            f"{key}: auto: the budget ({total} samples) leaves fewer than {_min_steps(cfg)} "
            f"steps{after} even at a batch of {batch}; raise the budget"
            + (", lower batch.micro_size" if cfg.batch.micro_size else "")
            + (" or shorten the warmup" if after else "")
        )
    if smallest.planned > allowance:
        unit = "tokens" if cfg.train.max_tokens is not None else "samples"
        per = workload.tokens_per_sample if unit == "tokens" else 1
        raise ConfigError(
            f"batch.size: auto needs a pilot of at least {smallest.planned * per} {unit}, more "
            f"than batch.pilot={cfg.batch.pilot:g} of the budget ({total * per} {unit}); raise "
            f"the budget or batch.pilot (at most 0.1), or set batch.size"
        )
    # Shares of the allowance: 25 % to the first range test (when there is one), 20 % to the
    # warm steps, 30 % to the measurements; a second range test at the chosen batch takes
    # what is left (choose_auto).
    return PilotPlan(
        total,
        allowance,
        batch,
        _clamp(0.25 * allowance / batch, LR_STEPS) if lr_auto else 0,
        _clamp(0.2 * allowance / batch, WARM_STEPS),
        _clamp(0.3 * allowance / (2 * batch), MEASUREMENTS),
    )


def choose_batch(
    b_noise: float,
    samples: int,
    floor: int,
    unit: int,
    n_train: int,
    top: int | None = None,
    min_steps: int = MIN_STEPS,
) -> tuple[int, str]:
    """The batch for a run of ``samples`` training samples: the critical batch ``b_noise``,
    at least ``floor`` (the batch the pilot measured the LR at), at most ``samples /
    min_steps`` (and ``top``, and the training set), in whole ``unit``s (micro-batches); with
    the reason, for auto.json."""
    cap = min(samples // min_steps, n_train, top or n_train)
    known = math.isfinite(b_noise) and b_noise > 0
    if not known:
        target, why = floor, "the pilot's batch (the noise scale was not measurable)"
    elif b_noise > cap:
        target = cap
        why = f"the critical batch ({b_noise:.0f}) capped so the budget leaves {min_steps} steps"
    elif b_noise < floor:
        target = floor
        why = (
            f"the pilot's batch {floor}: the critical batch measured early (B_simple = "
            f"{b_noise:.1f}) is below it, and the noise scale only grows as the loss falls"
        )
    else:
        target, why = (
            b_noise,
            f"the critical batch B_simple = {b_noise:.1f} (McCandlish et al. 2018)",
        )
    size = max(unit, int(min(target, cap) // unit) * unit)
    return size, why


def warmup_rule(cfg: Config, steps: int) -> tuple[int, str]:
    """``schedule.warmup: auto`` in steps for a run of ``steps``, with the reason."""
    o = cfg.optimizer
    cap = int(WARMUP_CAP * steps)
    if OPTIMIZERS[o.name].width_rule and len(o.betas) > 1 and o.betas[1] < 1:
        rule = round(2 / (1 - o.betas[1]))
        why = f"2 / (1 - beta2) = {rule} steps (Ma & Yarats 2021)"
    else:
        rule = round(0.05 * steps)
        why = "5 % of the run (an optimizer without a second moment)"
    if rule > cap:
        return cap, f"{why}, capped at {WARMUP_CAP:.0%} of the {steps} steps"
    return rule, why


def _with(cfg: Config, **sections: dict[str, Any]) -> Config:
    return dataclasses.replace(
        cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()}
    )


def _pilot_config(cfg: Config, batch: int, lr: float | None) -> Config:
    """The config the pilot trains with: the small batch, a constant LR, no budget of its own."""
    return _with(
        cfg,
        batch={"size": batch, "micro_size": None, "schedule": []},
        schedule={"name": "constant", "warmup": 0},
        optimizer={} if lr is None else {"lr": lr},
        # no budget of its own; no compilation (it pays over a run, not a few steps) and the
        # smallest evaluation the trainer's last step makes
        train={
            "max_samples": None,
            "max_tokens": None,
            "max_time_s": None,
            "lawa": None,
            "compile": False,
            "eval_samples": 8,
        },
    )


def _range_test(cfg: Config, workload: Workload, batch: int, steps: int, **ramp: float) -> Any:
    return lr_range_test(_pilot_config(cfg, batch, None), workload, steps=steps, **ramp)


def choose_auto(
    cfg: Config,
    workload: Workload,
    run_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Config, dict[str, Any] | None]:
    """``cfg`` with every ``auto`` decided, and what auto.json records (None: nothing was
    auto). Writes auto.json (and lr_find.json with its plot) into ``run_dir`` when given."""
    b, o, s = cfg.batch, cfg.optimizer, cfg.schedule
    if "auto" not in (b.size, o.lr, s.warmup):
        return cfg, None
    t0 = time.perf_counter()
    record: dict[str, Any] = {"decided": {}, "why": {}, "measured": {}}
    decided, why, measured = record["decided"], record["why"], record["measured"]
    lr_result = None
    plan = plan_pilot(cfg, workload)
    if plan is not None:
        spent = 0
        lr0 = None if o.lr == "auto" else float(o.lr)
        if lr0 is None:
            first = _range_test(cfg, workload, plan.batch, plan.lr_steps)
            lr0, spent = first.suggestion, first.samples
            measured["lr_range_test_small_batch"] = _range_summary(first, plan.batch)
            lr_result = first
        pilot = _pilot_config(cfg, plan.batch, lr0)
        model = workload.model
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with rng_preserved():
            try:
                train_first(pilot, workload, plan.warm_steps)
                est = estimate_noise_scale(
                    pilot,
                    workload,
                    b_small=max(1, plan.batch // 8),
                    b_big=2 * plan.batch,
                    measurements=plan.measurements,
                )
            finally:
                model.load_state_dict(weights)
        spent += plan.warm_steps * plan.batch + est.samples
        measured["noise_scale"] = {
            "b_simple": est.b_simple,
            "after_steps": plan.warm_steps,
            "at_batch": plan.batch,
            "lr": lr0,
            "measurements": plan.measurements,
            "history": est.history,
        }
        # With optimizer.lr: auto, the batch leaves room for a range test at itself (at least
        # LR_STEPS[0] steps of what the pilot has left): the LR that counts is the one for the
        # batch the run trains at, and a range test there measures it.
        room = (plan.allowance - spent) // LR_STEPS[0] if o.lr == "auto" else None
        size, why["batch.size"] = choose_batch(
            est.b_simple,
            plan.budget_samples - plan.allowance,
            plan.batch,
            b.micro_size or 1,
            workload.n_train,
            min((x for x in (b.max_size, room) if x), default=None),
            _min_steps(cfg),
        )
        decided["batch.size"] = size
        if o.lr == "auto":
            assert lr_result is not None  # o.lr == "auto": the small batch's test ran
            steps = min(LR_STEPS[1], (plan.allowance - spent) // size)
            if steps >= LR_STEPS[0]:
                # a decade either side of the small batch's loss-minimum LR: the larger batch
                # moves it by a small factor (square root to linear), so a narrow ramp spends
                # the steps where it matters, and the minimum the peak is taken from lies
                # inside the ramp, not at its end (a ramp that stops while the loss still
                # falls reports its last LR as the minimum)
                low, high = lr_result.min_loss_lr / 10, lr_result.min_loss_lr * 10
                second = _range_test(cfg, workload, size, steps, min_lr=low, max_lr=high)
                decided["optimizer.lr"], rule = peak_lr(cfg, second)
                spent += second.samples
                why["optimizer.lr"] = (
                    f"the LR range test at batch {size} ({steps} steps, {low:.3g} to "
                    f"{high:.3g}): {rule}"
                )
                measured["lr_range_test_chosen_batch"] = _range_summary(second, size)
                lr_result = second
            else:
                peak, rule = peak_lr(cfg, lr_result)
                decided["optimizer.lr"], scaled = _scaled_lr(
                    cfg, peak, plan.batch, size, est.b_simple
                )
                why["optimizer.lr"] = f"{rule}, {scaled}"
        seconds = time.perf_counter() - t0
        cfg = _spend(cfg, workload, size, spent, seconds)
        record["pilot"] = {
            "samples": spent,
            "tokens": spent * workload.tokens_per_sample,
            "share": spent / plan.budget_samples,
            "seconds": round(seconds, 3),
        }
    elif o.lr == "auto":
        lr_result = lr_range_test(_with(cfg, schedule={"warmup": 0}), workload)
        decided["optimizer.lr"], rule = peak_lr(cfg, lr_result)
        why["optimizer.lr"] = f"the LR range test at the run's batch: {rule}"
    if "optimizer.lr" in decided:
        cfg = _with(cfg, optimizer={"lr": decided["optimizer.lr"]})
    if s.warmup == "auto":
        steps = horizon(
            _with(cfg, schedule={"warmup": 0}), workload.n_train, workload.tokens_per_sample
        ).steps
        decided["schedule.warmup"], why["schedule.warmup"] = warmup_rule(cfg, steps)
        cfg = _with(cfg, schedule={"warmup": decided["schedule.warmup"]})
    if cfg.schedule.name == "wsd":
        h = horizon(cfg, workload.n_train, workload.tokens_per_sample).steps
        cool = cfg.schedule.decay_steps or round(cfg.schedule.decay_fraction * h)
        record["cooldown_steps"] = cool
        why["cooldown"] = (
            "schedule.decay_fraction of the run (20 % matches cosine: Hägele et al. 2024)"
        )
    if run_dir is not None:
        if lr_result is not None:
            write_lr_find(lr_result, run_dir)
        atomic_write_json(run_dir / "auto.json", record)
    for key, value in decided.items():
        log(f"cadence: {key}=auto -> {value:.4g} ({why[key]}; see auto.json)")
    return cfg, record


def peak_lr(cfg: Config, result: LRFindResult) -> tuple[float, str]:
    """The LR a run trains at, from a range test on its model and data, and why.

    A run at one LR throughout must stay well inside the stable region for all of it: the
    range test's cautious suggestion (the steeper of the steepest descent and a tenth of the
    loss minimum's LR). A run whose schedule warms up and anneals to the end spends only part
    of itself near its peak, and the annealing removes the noise a high LR leaves, so its peak
    may sit near the edge, as the one-cycle policy puts its maximum just below where the range
    test stops improving (Smith 2018): two thirds of the loss minimum's LR. Measured with
    benchmarks/auto_vs_hand.py (its section of benchmarks/README.md has the runs): the tenth
    left auto behind the default recipe on every corpus; two thirds beat a third on both
    corpora tried, and the minimum itself did better still on the one tried (prose): two
    thirds keeps a margin below the edge on data no one has looked at.
    """
    if cfg.schedule.name in ANNEALING:
        return result.min_loss_lr / PEAK_DIVISOR, (
            f"the LR at its loss minimum ({result.min_loss_lr:.3g}) / {PEAK_DIVISOR:g}, the peak "
            f"of an annealed {cfg.schedule.name} schedule"
        )
    return result.suggestion, "its suggestion, for a schedule that does not anneal"


def _range_summary(result: Any, batch: int) -> dict[str, Any]:
    """What auto.json keeps of a range test (lr_find.json has the last one's curve)."""
    return {
        "batch": batch,
        "steps": result.steps,
        "suggestion": result.suggestion,
        "min_loss_lr": result.min_loss_lr,
    }


def _min_steps(cfg: Config) -> int:
    """The fewest steps the chosen batch may leave: MIN_STEPS, and more than a warmup the
    user gave in steps."""
    warmup = cfg.schedule.warmup
    return max(MIN_STEPS, warmup + 1) if type(warmup) is int else MIN_STEPS


def _scaled_lr(cfg: Config, lr: float, batch: int, size: int, b_noise: float) -> tuple[float, str]:
    if OPTIMIZERS[cfg.optimizer.name].width_rule:
        return lr * math.sqrt(size / batch), (
            f"the range test's LR at batch {batch}, times sqrt({size}/{batch}) "
            "(square-root rule for Adam-like updates, Malladi et al. 2022)"
        )
    return lr_for_batch(lr, batch, b_noise, size), (
        f"the range test's LR at batch {batch}, moved to batch {size} by "
        "eps_max / (1 + B_noise / B) (McCandlish et al. 2018)"
    )


def _spend(cfg: Config, workload: Workload, size: int, samples: int, seconds: float) -> Config:
    """The decided batch, and the budget less what the pilot spent (it counts in the run's
    tokens and time); max_steps no longer cuts the data budget short."""
    t = cfg.train
    tps = workload.tokens_per_sample
    train: dict[str, Any] = {}
    if t.max_samples is not None:
        train["max_samples"] = t.max_samples - samples
    if t.max_tokens is not None:
        train["max_tokens"] = t.max_tokens - samples * tps
    if t.max_time_s is not None:
        train["max_time_s"] = max(t.max_time_s - seconds, 1.0)
    left = budget_samples(_with(cfg, train=train), tps)
    train["max_steps"] = max(t.max_steps, math.ceil(left / size) + 1)
    return _with(cfg, batch={"size": size}, train=train)
