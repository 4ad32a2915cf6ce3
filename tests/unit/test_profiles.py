"""Time to target, seed statistics and performance profiles on hand-built numbers.

Misses (infinite time) and ties are the cases AlgoPerf's definitions turn on, so each has a test
with the value worked out by hand.
"""

from __future__ import annotations

import math

import pytest

from cadence.bench.compare import aggregate
from cadence.bench.profiles import (
    INF,
    bootstrap_ci,
    median,
    performance_profile,
    performance_ratios,
    profile_score,
    time_to_target,
)
from cadence.bench.spec import Spec, StrategySpec, WorkloadEntry

ROWS = [
    {"step": 10, "samples": 320, "time_s": 0.5, "train_loss": 1.0},
    {"step": 20, "samples": 640, "time_s": 1.0, "train_loss": 0.8, "val_accuracy": 0.7},
    {"step": 30, "samples": 960, "time_s": 1.6, "train_loss": 0.6},
    {"step": 40, "samples": 1280, "time_s": 2.1, "train_loss": 0.5, "val_accuracy": 0.9},
]


def test_time_to_target_reads_the_target_row() -> None:
    got = time_to_target(ROWS, target_step=40)
    # rows from before train_cpu_s existed: CPU time falls back to the wall time
    assert got == {"steps": 40.0, "samples": 1280.0, "tokens": INF, "time": 2.1, "cpu": 2.1}
    rows = [{**r, "train_time_s": r["time_s"] - 0.1, "train_cpu_s": r["time_s"] / 2} for r in ROWS]
    got = time_to_target(rows, target_step=40)
    assert (got["time"], got["cpu"]) == (2.0, 1.05)


def test_time_to_target_tokens_for_text() -> None:
    rows = [{"step": 5, "samples": 40, "tokens": 40 * 64, "time_s": 3.0}]
    assert time_to_target(rows, 5)["tokens"] == 2560.0


def test_a_miss_is_infinite_on_every_measure() -> None:
    got = time_to_target(ROWS, target_step=None)
    assert all(math.isinf(v) for v in got.values())


def test_median_treats_misses_as_the_largest_values() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 3.0]) == 2.0
    assert median([1.0, INF, 2.0]) == 2.0  # one miss of three: still finite
    assert median([1.0, INF]) == INF  # half the seeds missed: the median is a miss
    assert median([INF, INF, 1.0]) == INF


def test_bootstrap_interval_brackets_the_median_and_keeps_inf() -> None:
    lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert 1.0 <= lo <= 3.0 <= hi <= 5.0
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    lo, hi = bootstrap_ci([1.0, INF, INF])
    assert lo == 1.0 and hi == INF  # never NaN
    assert bootstrap_ci([7.0]) == (7.0, 7.0)


def test_ratios_with_misses_ties_and_an_unreached_workload() -> None:
    times = {
        "a": {"w1": 10.0, "w2": 5.0, "w3": INF},
        "b": {"w1": 20.0, "w2": 5.0, "w3": INF},  # tie with a on w2
        "c": {"w1": INF, "w2": 15.0},  # misses w1, not run on w3
    }
    r = performance_ratios(times, ["w1", "w2", "w3"])
    assert r["a"] == {"w1": 1.0, "w2": 1.0, "w3": INF}
    assert r["b"] == {"w1": 2.0, "w2": 1.0, "w3": INF}
    assert r["c"] == {"w1": INF, "w2": 3.0, "w3": INF}


def test_profile_is_the_fraction_within_tau() -> None:
    ratios = {"w1": 1.0, "w2": 2.0, "w3": INF, "w4": 4.5}
    assert performance_profile(ratios, [1.0, 1.99, 2.0, 4.0, 100.0]) == [
        0.25,
        0.25,
        0.5,
        0.5,
        0.75,
    ]


def test_score_is_the_normalised_area_up_to_tau_max() -> None:
    # Fastest everywhere -> 1; never within tau_max -> 0.
    assert profile_score({"w1": 1.0, "w2": 1.0}) == 1.0
    assert profile_score({"w1": INF, "w2": 5.0}) == 0.0
    # r=2 on one of two workloads contributes (4-2)/3/2 = 1/3; r=1 contributes 1/2.
    assert profile_score({"w1": 1.0, "w2": 2.0}) == pytest.approx(0.5 + 1 / 3)
    # A miss contributes nothing; ties both get full credit.
    assert profile_score({"w1": 1.0, "w2": INF}) == pytest.approx(0.5)
    assert profile_score({"w1": 4.0}) == 0.0  # exactly tau_max: area zero
    assert profile_score({"w1": 2.5}, tau_max=3.0) == pytest.approx(0.25)


def test_score_matches_a_numerical_integral_of_the_profile() -> None:
    ratios = {"w1": 1.0, "w2": 1.3, "w3": 2.7, "w4": INF, "w5": 3.9}
    n = 30_000
    taus = [1 + 3 * (i + 0.5) / n for i in range(n)]
    area = sum(performance_profile(ratios, taus)) * 3 / n / 3
    assert profile_score(ratios) == pytest.approx(area, abs=1e-3)


def _spec() -> Spec:
    return Spec(
        name="hand",
        workloads={
            "acc": WorkloadEntry("acc", "digits", 0.9, 100),
            "sub": WorkloadEntry("sub", "logreg", 1e-3, 100),
        },
        strategies={"fast": StrategySpec("fast"), "slow": StrategySpec("slow")},
        seeds=[0, 1, 2],
    )


def _rec(strategy: str, workload: str, seed: int, steps: float, time: float) -> dict:
    reached = math.isfinite(steps)
    return {
        "strategy": strategy,
        "workload": workload,
        "seed": seed,
        "trial": "default",
        "params": {},
        "reached": reached,
        "error": None,
        "steps_to_target": steps,
        "samples_to_target": steps * 32,
        "tokens_to_target": INF,
        "time_to_target": time,
        "cpu_to_target": time,
        "final_metric": 0.9 if reached else 0.5,
        "best_metric": 0.9 if reached else 0.5,
    }


def test_aggregate_medians_reach_rate_profiles_and_winners() -> None:
    recs = [
        _rec("fast", "acc", 0, 10, 1.0),
        _rec("fast", "acc", 1, 20, 2.0),
        _rec("fast", "acc", 2, 30, 3.0),
        _rec("slow", "acc", 0, 40, 4.0),
        _rec("slow", "acc", 1, INF, INF),
        _rec("slow", "acc", 2, 40, 4.0),
        # on "sub" nobody reaches the target
        *(_rec(s, "sub", k, INF, INF) for s in ("fast", "slow") for k in range(3)),
    ]
    out = aggregate(_spec(), recs)
    rows = {(r["strategy"], r["workload"]): r for r in out["table"]}
    assert rows[("fast", "acc")]["time_to_target"]["median"] == 2.0
    assert rows[("fast", "acc")]["samples_to_target"]["median"] == 640
    assert rows[("slow", "acc")]["reached"] == 2
    assert rows[("slow", "acc")]["steps_to_target"]["median"] == 40
    assert rows[("fast", "sub")]["reached"] == 0
    prof = out["profiles"]["time"]
    assert prof["ratios"]["slow"] == {"acc": 2.0, "sub": INF}
    # fast: 1/2 (acc, r=1) + 0 (sub) ; slow: (4-2)/3/2 = 1/3
    assert prof["score"]["fast"] == pytest.approx(0.5)
    assert prof["score"]["slow"] == pytest.approx(1 / 3)
    assert out["winners"]["acc"] == {
        "best": "fast",
        "value": 2.0,
        "runner_up": "slow",
        "factor": 2.0,
    }
    assert out["winners"]["sub"]["best"] is None
