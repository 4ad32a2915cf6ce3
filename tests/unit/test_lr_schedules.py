"""LR schedules: step-by-step agreement with torch, closed forms, and registry-wide invariants."""

from __future__ import annotations

import math
import pickle
import random
import re
import warnings
from collections.abc import Callable

import pytest
import torch
from torch.optim import lr_scheduler as tls

from cadence.schedules import (
    SCHEDULES,
    build_schedule,
    constant,
    cosine,
    exponential,
    inverse_sqrt,
    join,
    linear,
    multistep,
    onecycle,
    polynomial,
    step,
    warmup,
    wsd,
    wsd_cooldown_start,
)

BASE_LR = 0.37  # not a power of two, so scaling errors would show


def torch_lrs(
    make: Callable[[torch.optim.Optimizer], tls.LRScheduler], n: int, every: int = 1
) -> list[float]:
    """The LR torch uses for the step with t steps completed, for t in range(n).

    The scheduler is stepped after every `every` optimizer steps (every > 1 emulates stepping
    a per-epoch scheduler once an epoch).
    """
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=BASE_LR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = make(opt)
        out = []
        for t in range(n):
            out.append(float(opt.param_groups[0]["lr"]))
            # No opt.step(): the schedulers only read and write param_groups, and the first
            # optimizer step imports torch's compiler stack (seconds), which we do not need.
            if (t + 1) % every == 0 and t + 1 < n:
                sched.step()
    return out


def assert_matches(schedule: Callable[[int], float], expected: list[float]) -> None:
    for t, lr in enumerate(expected):
        ours = BASE_LR * schedule(t)
        assert math.isclose(ours, lr, rel_tol=1e-9, abs_tol=1e-12 * BASE_LR), (t, ours, lr)


# ----------------------------------------------------------------------------- torch agreement


@pytest.mark.parametrize(("step_size", "gamma"), [(1, 0.5), (3, 0.1), (7, 0.9), (10, 1.0)])
def test_step_matches_torch_steplr(step_size: int, gamma: float) -> None:
    expected = torch_lrs(lambda o: tls.StepLR(o, step_size=step_size, gamma=gamma), 60)
    assert_matches(step(step_size, gamma), expected)


@pytest.mark.parametrize(
    ("milestones", "gamma"), [([2, 5, 9], 0.1), ([0, 4], 0.5), ([30], 0.3), ([1, 2, 3, 40], 0.9)]
)
def test_multistep_matches_torch(milestones: list[int], gamma: float) -> None:
    expected = torch_lrs(lambda o: tls.MultiStepLR(o, milestones=milestones, gamma=gamma), 60)
    assert_matches(multistep(milestones, gamma), expected)


@pytest.mark.parametrize(("gamma", "every"), [(0.9, 1), (0.99, 1), (1.0, 1), (0.5, 4), (0.8, 7)])
def test_exponential_matches_torch_per_step_and_per_epoch(gamma: float, every: int) -> None:
    expected = torch_lrs(lambda o: tls.ExponentialLR(o, gamma=gamma), 80, every=every)
    assert_matches(exponential(gamma, every), expected)


@pytest.mark.parametrize(("total", "min_ratio"), [(1, 0.0), (10, 0.0), (37, 0.1), (100, 0.5)])
def test_cosine_matches_torch_up_to_total(total: int, min_ratio: float) -> None:
    expected = torch_lrs(
        lambda o: tls.CosineAnnealingLR(o, T_max=total, eta_min=min_ratio * BASE_LR), total + 1
    )
    assert_matches(cosine(total, min_ratio), expected)


@pytest.mark.parametrize(
    ("total", "start", "end"), [(10, 1.0, 0.0), (7, 0.25, 0.75), (25, 1.0, 0.1), (1, 0.5, 1.0)]
)
def test_linear_matches_torch(total: int, start: float, end: float) -> None:
    expected = torch_lrs(
        lambda o: tls.LinearLR(o, start_factor=start, end_factor=end, total_iters=total),
        total + 10,
    )
    assert_matches(linear(total, start, end), expected)


@pytest.mark.parametrize(("total", "power"), [(10, 1.0), (20, 2.0), (15, 0.5), (1, 3.0)])
def test_polynomial_matches_torch(total: int, power: float) -> None:
    expected = torch_lrs(lambda o: tls.PolynomialLR(o, total_iters=total, power=power), total + 10)
    assert_matches(polynomial(total, power), expected)


@pytest.mark.parametrize(
    ("total", "pct_start", "div", "final_div", "anneal"),
    [
        (100, 0.3, 25.0, 1e4, "cos"),
        (100, 0.3, 25.0, 1e4, "linear"),
        (17, 0.25, 10.0, 100.0, "cos"),
        (50, 0.5, 5.0, 1e3, "linear"),
        (8, 0.05, 25.0, 1e4, "cos"),  # ramp ends before step 0: torch starts in the anneal
        (33, 0.9, 3.0, 2.0, "cos"),
        (2, 1.0, 25.0, 1e4, "linear"),
    ],
)
def test_onecycle_matches_torch(
    total: int, pct_start: float, div: float, final_div: float, anneal: str
) -> None:
    expected = torch_lrs(
        lambda o: tls.OneCycleLR(
            o,
            max_lr=BASE_LR,
            total_steps=total,
            pct_start=pct_start,
            anneal_strategy=anneal,
            div_factor=div,
            final_div_factor=final_div,
            cycle_momentum=False,
            three_phase=False,
        ),
        total,  # torch refuses to step past total_steps
    )
    sched = onecycle(total, pct_start, div, final_div, anneal)
    assert_matches(sched, expected)
    # Past the end we hold the final value rather than raising.
    assert sched(total + 5) == sched(total - 1)


def test_onecycle_ramp_ending_at_step_zero_is_at_peak() -> None:
    # pct_start * total - 1 == 0: torch divides 0 by 0 here; the ramp is complete, so the peak.
    assert onecycle(10, 0.1)(0) == 1.0


# ----------------------------------------------------------------------------- closed forms


def _cooldown_closed_form(kind: str, m: float, p: float) -> float:
    if kind == "linear":
        return 1.0 - (1.0 - m) * p
    if kind == "1-sqrt":
        return m + (1.0 - m) * (1.0 - math.sqrt(p))
    return m + (1.0 - m) * (1.0 + math.cos(math.pi * p)) / 2.0


@pytest.mark.parametrize("cooldown", ["linear", "1-sqrt", "cosine"])
@pytest.mark.parametrize(
    ("total", "fraction", "min_ratio"), [(100, 0.2, 0.0), (10, 0.25, 0.1), (37, 0.5, 0.3)]
)
def test_wsd_closed_form(cooldown: str, total: int, fraction: float, min_ratio: float) -> None:
    s = wsd(total, fraction, cooldown, min_ratio)
    decay_steps = round(fraction * total)
    start = total - decay_steps
    for t in range(total + 20):
        p = min(1.0, max(0.0, (t - start) / decay_steps))
        expected = 1.0 if t < start else _cooldown_closed_form(cooldown, min_ratio, p)
        assert math.isclose(s(t), expected, rel_tol=1e-12, abs_tol=1e-15), t
    # Boundaries: flat through decay_start (p = 0 there), floor exactly at and after total.
    assert s(start - 1) == 1.0
    assert s(start) == 1.0
    assert s(start + 1) < 1.0
    assert s(total) == pytest.approx(min_ratio, abs=1e-15)
    assert s(total + 1000) == pytest.approx(min_ratio, abs=1e-15)
    values = [s(t) for t in range(total + 5)]
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_wsd_edges_and_extension() -> None:
    assert all(wsd(50, 0.0)(t) == 1.0 for t in range(80))
    full = wsd(40, 1.0, "linear", 0.0)
    assert full(0) == 1.0 and full(20) == pytest.approx(0.5) and full(40) == 0.0
    # Extending a run moves the cooldown to the new end instead of leaving it mid-run.
    short, long = wsd(100, 0.2), wsd(200, 0.2)
    assert short(100) == 0.0
    assert long(100) == 1.0
    assert long(200) == 0.0


@pytest.mark.parametrize("timescale", [1, 4, 16, 1000])
def test_inverse_sqrt_closed_form(timescale: int) -> None:
    s = inverse_sqrt(timescale)
    for t in range(timescale):
        assert s(t) == 1.0
    for t in range(timescale - 1, timescale + 200):
        assert math.isclose(s(t), math.sqrt(timescale / (t + 1)), rel_tol=1e-12)
    # 1/sqrt decay: quadrupling the step count halves the multiplier.
    t0 = 2 * timescale
    assert math.isclose(s(4 * (t0 + 1) - 1), s(t0) / 2, rel_tol=1e-12)


def test_warmup_ramps_then_shifts_inner() -> None:
    inner = cosine(20, 0.1)
    s = warmup(inner, 5)
    for t in range(5):
        assert s(t) == (t + 1) / 5
    assert s(4) == 1.0
    for t in range(5, 40):
        assert s(t) == inner(t - 5)
    assert warmup(inner, 0) is inner


def test_join_switches_pieces_with_their_own_clock() -> None:
    a, b, c = constant(), linear(10, 1.0, 0.0), exponential(0.5)
    s = join([a, b, c], [5, 15])
    for t in range(5):
        assert s(t) == 1.0
    for t in range(5, 15):
        assert s(t) == b(t - 5)
    for t in range(15, 30):
        assert s(t) == c(t - 15)
    assert join([b], [])(3) == b(3)


@pytest.mark.parametrize(
    ("schedules", "boundaries"),
    [([constant()], [3]), ([constant(), constant()], []), ([constant()] * 3, [5, 5])],
)
def test_join_rejects_bad_shapes(schedules: list, boundaries: list[int]) -> None:
    with pytest.raises(ValueError, match="schedule.boundaries"):
        join(schedules, boundaries)


# ----------------------------------------------------------------------------- build_schedule

OPTIONS = dict(
    gamma=0.5,
    step_size=7,
    milestones=(3, 11, 40),
    min_lr_ratio=0.05,
    decay_fraction=0.3,
    power=2.0,
    every=3,
    timescale=None,
    pct_start=0.25,
)


def _all_cases() -> list[tuple[str, int, int, str]]:
    cases = []
    for name in SCHEDULES:
        for total, warm in [(1, 0), (7, 0), (7, 3), (100, 0), (100, 10)]:
            for cooldown in ("linear", "1-sqrt", "cosine") if name == "wsd" else ("linear",):
                cases.append((name, total, warm, cooldown))
    return cases


@pytest.mark.parametrize(("name", "total", "warm", "cooldown"), _all_cases())
def test_registry_invariants(name: str, total: int, warm: int, cooldown: str) -> None:
    s = build_schedule(name, total_steps=total, warmup=warm, cooldown=cooldown, **OPTIONS)
    ts = list(range(total + 30))
    forward = [s(t) for t in ts]
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in forward), forward
    # Pure: any evaluation order, any number of times, gives the same numbers.
    shuffled = ts[:]
    random.Random(0).shuffle(shuffled)
    assert {t: s(t) for t in shuffled} == dict(zip(ts, forward))
    assert [s(t) for t in ts] == forward
    # Warmup ramps linearly to the body's start.
    for t in range(warm):
        assert s(t) == (t + 1) / warm
    # And the whole thing survives a pickle round trip (worker processes).
    assert [pickle.loads(pickle.dumps(s))(t) for t in ts] == forward


@pytest.mark.parametrize("name", ["linear", "cosine", "polynomial", "wsd"])
@pytest.mark.parametrize("warm", [0, 10])
def test_horizon_schedules_reach_floor_at_total_steps(name: str, warm: int) -> None:
    s = build_schedule(name, total_steps=100, warmup=warm, min_lr_ratio=0.05)
    assert s(warm) == 1.0
    assert s(100) == pytest.approx(0.05, abs=1e-15)
    assert s(99) > 0.05


def test_build_schedule_defaults_and_aliases() -> None:
    assert build_schedule("step", total_steps=90)(30) == 0.1  # step_size defaults to 90 // 3
    assert build_schedule("step", total_steps=90)(29) == 1.0
    assert build_schedule("inverse_sqrt", total_steps=50)(3) == build_schedule(
        "inverse-sqrt", total_steps=50
    )(3)
    # timescale defaults to the warmup: hold the peak for `warmup` more steps, then decay.
    s = build_schedule("inverse-sqrt", total_steps=1000, warmup=10)
    assert s(19) == 1.0
    assert s(20) == pytest.approx(math.sqrt(10 / 11))
    assert build_schedule("onecycle", total_steps=100)(0) == pytest.approx(1 / 25)
    assert build_schedule("constant", total_steps=5, warmup=0)(4) == 1.0


@pytest.mark.parametrize(
    ("name", "kwargs", "key"),
    [
        ("nope", {}, "schedule.name"),
        ("cosine", {"total_steps": 0}, "train.max_steps"),
        ("cosine", {"warmup": -1}, "schedule.warmup"),
        ("cosine", {"warmup": 100}, "schedule.warmup"),
        ("cosine", {"warmup": 2.5}, "schedule.warmup"),
        ("step", {"gamma": 1.5}, "schedule.gamma"),
        ("step", {"gamma": 0.0}, "schedule.gamma"),
        ("exponential", {"gamma": float("nan")}, "schedule.gamma"),
        ("step", {"step_size": 0}, "schedule.step_size"),
        ("step", {"step_size": 2.5}, "schedule.step_size"),
        ("exponential", {"every": 0}, "schedule.every"),
        ("cosine", {"min_lr_ratio": -0.1}, "schedule.min_lr_ratio"),
        ("linear", {"min_lr_ratio": 1.5}, "schedule.min_lr_ratio"),
        ("wsd", {"decay_fraction": 1.2}, "schedule.decay_fraction"),
        ("wsd", {"cooldown": "sqrt"}, "schedule.cooldown"),
        ("multistep", {"milestones": ()}, "schedule.milestones"),
        ("multistep", {"milestones": (5, 5)}, "schedule.milestones"),
        ("multistep", {"milestones": (9, 3)}, "schedule.milestones"),
        ("multistep", {"milestones": (-1, 3)}, "schedule.milestones"),
        ("multistep", {"milestones": (1.5,)}, "schedule.milestones"),
        ("polynomial", {"power": 0.0}, "schedule.power"),
        ("inverse-sqrt", {"timescale": 0}, "schedule.timescale"),
        ("onecycle", {"pct_start": 1.5}, "schedule.pct_start"),
    ],
)
def test_build_schedule_errors_name_the_key(name: str, kwargs: dict, key: str) -> None:
    kwargs = {"total_steps": 100, **kwargs}
    with pytest.raises(ValueError, match="^" + re.escape(key)):
        build_schedule(name, **kwargs)


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError) as err:
        build_schedule("cosinus", total_steps=10)
    assert "cosinus" in str(err.value)
    assert all(n in str(err.value) for n in SCHEDULES)


@pytest.mark.parametrize(
    ("builder", "key"),
    [
        (lambda: linear(10, start_factor=1.5), "schedule.start_factor"),
        (lambda: linear(10, end_factor=-0.5), "schedule.end_factor"),
        (lambda: cosine(0), "schedule.total"),
        (lambda: onecycle(10, div_factor=0.5), "schedule.div_factor"),
        (lambda: onecycle(10, final_div_factor=0.0), "schedule.final_div_factor"),
        (lambda: onecycle(10, anneal="cosine"), "schedule.anneal"),
        (lambda: warmup(constant(), -1), "schedule.warmup"),
    ],
)
def test_builder_errors_name_the_key(builder: Callable[[], object], key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(key)):
        builder()


def test_negative_step_is_rejected() -> None:
    with pytest.raises(ValueError):
        exponential(0.5)(-1)


def test_wsd_decay_steps_is_the_cooldown_decay_fraction_gives_in_steps() -> None:
    # round(0.2 * (100 - 10)) = 18 cooldown steps either way
    by_fraction = build_schedule("wsd", total_steps=100, warmup=10, decay_fraction=0.2)
    by_steps = build_schedule("wsd", total_steps=100, warmup=10, decay_steps=18)
    assert [by_steps(t) for t in range(120)] == [by_fraction(t) for t in range(120)]
    seventy = build_schedule("wsd", total_steps=100, warmup=10, decay_steps=30)
    assert seventy(69) == 1.0 and seventy(70) == 1.0 and seventy(71) < 1.0 and seventy(100) == 0.0
    with pytest.raises(
        ValueError, match=r"^schedule\.decay_steps: must be an integer in \[0, 90\]"
    ):
        build_schedule("wsd", total_steps=100, warmup=10, decay_steps=91)


@pytest.mark.parametrize(
    "total, warm, fraction, steps",
    [(100, 10, 0.2, None), (100, 10, 0.2, 30), (100, 0, 0.35, None), (57, 7, 0.5, None)],
)
def test_wsd_cooldown_start_is_the_last_step_at_the_peak(
    total: int, warm: int, fraction: float, steps: int | None
) -> None:
    """What `cadence cooldown` calls the end of the stable phase is where the trained schedule
    leaves its peak: the last step whose LR is still 1.0 (the cooldown's p = 0)."""
    s = build_schedule(
        "wsd", total_steps=total, warmup=warm, decay_fraction=fraction, decay_steps=steps
    )
    at_peak = [t for t in range(warm, total + 1) if s(t) == 1.0]
    assert wsd_cooldown_start(total, warm, fraction, steps) == max(at_peak)
