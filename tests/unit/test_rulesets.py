"""Compare's tuning rulesets: the same budget for every strategy, independent studies, the
median of study bests, a miss counted as infinite; and the paired test on constructed data."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
from scipy import stats

from cadence.bench.compare import aggregate
from cadence.bench.plan import plan_runs
from cadence.bench.rulesets import sample_points, study_bests
from cadence.bench.significance import mean_ci, paired_test
from cadence.bench.spec import load_spec, with_ruleset
from cadence.config import ConfigError
from cadence.tune.space import parse_space

INF = math.inf

SPEC = """
name: rules
tuning: {ruleset: external, trials: 4, studies: 3}
defaults: {train.eval_every: 5}
workloads:
  logreg: {target: 0.05, max_steps: 40}
  digits: {target: 0.6, max_steps: 40, set: {model.hidden: [16]}}
strategies:
  sgd:
    set: {optimizer.name: sgd, optimizer.lr: 0.3}
    search: {optimizer.lr: {low: 0.01, high: 3.0, log: true}}
  adamw:
    set: {optimizer.name: adamw, optimizer.lr: 0.01}
    search: {optimizer.lr: {low: 1.0e-4, high: 0.1, log: true},
             optimizer.weight_decay: {low: 0.0, high: 0.1}}
  sf:
    set: {optimizer.name: schedulefree-adamw, optimizer.lr: 0.01}
"""


@pytest.fixture
def spec_path(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(SPEC)
    return path


def _unit(lr: float, low: float, high: float) -> float:
    return (math.log(lr) - math.log(low)) / (math.log(high) - math.log(low))


def test_every_searched_strategy_gets_the_same_budget_in_every_study(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    plans = plan_runs(spec, Path("/nonexistent"), "studies")
    for s, trials in (("sgd", 4), ("adamw", 4), ("sf", 1)):  # sf has no space: self-tuned
        for w in ("logreg", "digits"):
            for seed in (0, 1, 2):
                mine = [p for p in plans if (p.strategy, p.workload, p.seed) == (s, w, seed)]
                assert len(mine) == trials
                assert {p.config.train.seed for p in mine} == {seed}
    assert len(plans) == (4 + 4 + 1) * 2 * 3
    assert len({p.run_dir for p in plans}) == len(plans)
    # The point is applied on top of the strategy's own settings.
    p = next(p for p in plans if p.strategy == "adamw" and p.trial == "trial2")
    assert p.config.optimizer.lr == p.params["optimizer.lr"]
    assert p.config.optimizer.weight_decay == p.params["optimizer.weight_decay"]


def test_a_workload_can_give_every_strategy_fewer_trials(spec_path: Path) -> None:
    text = spec_path.read_text().replace(
        "digits: {target: 0.6, max_steps: 40,", "digits: {target: 0.6, max_steps: 40, trials: 2,"
    )
    spec_path.write_text(text)
    spec = load_spec(spec_path)
    plans = plan_runs(spec, Path("/nonexistent"), "studies")
    for s, per in (("sgd", {"logreg": 4, "digits": 2}), ("sf", {"logreg": 1, "digits": 1})):
        for w, trials in per.items():
            for seed in (0, 1, 2):
                mine = [p for p in plans if (p.strategy, p.workload, p.seed) == (s, w, seed)]
                assert len(mine) == trials
    # the same seed draws the same first points: the cheaper workload's trials are a prefix
    first = {
        w: [p.params for p in plans if (p.strategy, p.workload, p.seed) == ("adamw", w, 1)]
        for w in ("logreg", "digits")
    }
    assert first["digits"] == sample_points(spec.strategies["adamw"].search, 2, seed=1)
    # --trials N means N everywhere, the per-workload budgets too
    again = with_ruleset(load_spec(spec_path), "external", trials=3)
    plans = plan_runs(again, Path("/nonexistent"), "studies")
    assert sum(1 for p in plans if (p.strategy, p.workload, p.seed) == ("sgd", "digits", 0)) == 3
    assert "trials" not in again.source["workloads"]["digits"]
    with pytest.raises(ConfigError, match=r"^workloads\.digits\.trials: expected a positive"):
        spec_path.write_text(text.replace("trials: 2,", "trials: 0,"))
        load_spec(spec_path)


def test_studies_are_independent_and_reproducible_and_points_fill_the_range() -> None:
    space = parse_space({"optimizer.lr": {"low": 1e-3, "high": 1.0, "log": True}})
    a, b = sample_points(space, 4, seed=0), sample_points(space, 4, seed=1)
    assert a == sample_points(space, 4, seed=0)
    assert a != b
    for points in (a, b):
        us = sorted(_unit(p["optimizer.lr"], 1e-3, 1.0) for p in points)
        # The first 2^k points of a base-2 Halton sequence, scrambled or not, put one point in
        # each interval [j/2^k, (j+1)/2^k): four trials cover the four quarters of the log range.
        assert [math.floor(u * 4) for u in us] == [0, 1, 2, 3]


def test_strategies_in_a_study_get_the_same_unit_points() -> None:
    narrow = parse_space({"optimizer.lr": {"low": 1e-4, "high": 1e-2, "log": True}})
    wide = parse_space({"optimizer.lr": {"low": 1e-2, "high": 10.0, "log": True}})
    pa, pb = sample_points(narrow, 5, seed=7), sample_points(wide, 5, seed=7)
    for x, y in zip(pa, pb, strict=True):
        assert _unit(x["optimizer.lr"], 1e-4, 1e-2) == pytest.approx(
            _unit(y["optimizer.lr"], 1e-2, 10.0), abs=1e-9
        )


def test_integer_and_categorical_values_stay_in_their_space() -> None:
    space = parse_space(
        {"schedule.warmup": {"low": 0, "high": 3}, "optimizer.name": ["sgd", "adamw"]}
    )
    points = sample_points(space, 16, seed=3)
    assert {p["schedule.warmup"] for p in points} == {0, 1, 2, 3}
    assert {p["optimizer.name"] for p in points} == {"sgd", "adamw"}


def _rec(s: str, w: str, seed: int, trial: int, steps: float, cpu: float) -> dict:
    return {
        "strategy": s,
        "workload": w,
        "seed": seed,
        "trial": f"trial{trial}",
        "params": {"optimizer.lr": 0.1 * (trial + 1)},
        "reached": math.isfinite(steps),
        "error": None,
        "steps_to_target": steps,
        "samples_to_target": steps * 32,
        "tokens_to_target": INF,
        "time_to_target": cpu * 1.5,
        "cpu_to_target": cpu,
        "best_metric": 0.9 if math.isfinite(steps) else 0.5,
        "final_metric": 0.9 if math.isfinite(steps) else 0.5,
    }


def test_a_study_is_its_fastest_trial_and_a_strategy_the_median_of_studies(
    spec_path: Path,
) -> None:
    spec = load_spec(spec_path)
    # cpu to target per (study, trial); a row of infs is a study whose every trial missed.
    sgd = {0: [INF, 4.0, 9.0, INF], 1: [6.0, INF, 2.0, INF], 2: [INF, INF, INF, INF]}
    adamw = {0: [3.0, 5.0, INF, INF], 1: [1.0, 8.0, INF, 7.0], 2: [2.5, INF, 4.0, INF]}
    recs = [
        _rec(name, "logreg", seed, j, 10 * c, c)
        for name, table in (("sgd", sgd), ("adamw", adamw))
        for seed, row in table.items()
        for j, c in enumerate(row)
    ]
    bests = study_bests(recs, "cpu", {"logreg": False})
    by = {(r["strategy"], r["seed"]): r for r in bests}
    assert len(bests) == 6
    assert by[("sgd", 0)]["cpu_to_target"] == 4.0 and by[("sgd", 0)]["trial"] == "trial1"
    assert by[("sgd", 1)]["cpu_to_target"] == 2.0
    assert by[("sgd", 2)]["cpu_to_target"] == INF and by[("sgd", 2)]["study_reached"] == 0
    assert by[("adamw", 1)]["params"] == {"optimizer.lr": 0.1}
    spec.strategies.pop("sf")
    out = aggregate(spec, bests)
    rows = {r["strategy"]: r for r in out["table"] if r["workload"] == "logreg"}
    # sgd's studies: 4, 2, inf -> median 4 (a miss is the largest value, not dropped)
    assert rows["sgd"]["cpu_to_target"]["median"] == 4.0
    assert rows["sgd"]["reached"] == 2
    # adamw's: 3, 1, 2.5 -> 2.5; its winning point is the fastest study's
    assert rows["adamw"]["cpu_to_target"]["median"] == 2.5
    assert rows["adamw"]["params"] == {"optimizer.lr": 0.1}
    assert rows["adamw"]["trials_per_study"] == 4
    assert out["winners"]["logreg"]["best"] == "adamw"
    assert out["profiles"]["cpu"]["ratios"]["sgd"]["logreg"] == pytest.approx(4.0 / 2.5)
    test = out["significance"]["logreg"]
    assert (test["a"], test["b"], test["seeds"]) == ("adamw", "sgd", [0, 1, 2])
    assert test["cpu"]["test"] == "sign"  # study 2 of sgd missed: no difference is defined
    assert (test["cpu"]["wins_a"], test["cpu"]["wins_b"]) == (3, 0)  # 3<4, 1<2, 2.5<inf
    assert test["cpu"]["p"] == pytest.approx(2 * 0.5**3) and not test["cpu"]["significant"]


def test_more_misses_than_hits_make_the_median_infinite(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    spec.strategies = {"sgd": spec.strategies["sgd"]}
    recs = [_rec("sgd", "logreg", k, 0, s, s) for k, s in enumerate((INF, 3.0, INF))]
    row = next(r for r in aggregate(spec, recs)["table"] if r["workload"] == "logreg")
    assert row["cpu_to_target"]["median"] == INF
    assert row["steps_mean_ci"] is None


def test_paired_t_matches_its_closed_form() -> None:
    a = [100.0, 120.0, 90.0, 130.0, 110.0]
    b = [110.0, 125.0, 104.0, 131.0, 118.0]
    d = [x - y for x, y in zip(a, b, strict=True)]
    n, mean, sd = len(d), statistics.fmean(d), statistics.stdev(d)
    t = mean / (sd / math.sqrt(n))
    res = paired_test(a, b)
    assert res["test"] == "paired t"
    assert res["mean_diff"] == pytest.approx(mean)
    assert res["p"] == pytest.approx(2 * stats.t.sf(abs(t), n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    assert res["ci"] == pytest.approx((mean - half, mean + half))
    assert res["significant"] == (res["p"] < 0.05)
    assert (res["wins_a"], res["wins_b"]) == (5, 0)


def test_noise_is_not_significant_and_a_constant_lead_is() -> None:
    noise = paired_test([10.0, 12.0, 10.0, 12.0], [12.0, 10.0, 12.0, 10.0])
    assert noise["mean_diff"] == 0.0 and noise["p"] == pytest.approx(1.0)
    assert not noise["significant"]
    lead = paired_test([10.0, 20.0, 30.0], [15.0, 25.0, 35.0])
    assert lead["p"] == 0.0 and lead["significant"] and lead["ci"] == (-5.0, -5.0)
    same = paired_test([10.0, 20.0], [10.0, 20.0])
    assert same["p"] == 1.0 and not same["significant"]
    assert paired_test([1.0], [2.0])["test"] == "too few studies"


def test_sign_test_with_misses_is_the_exact_binomial() -> None:
    # a first in all 5 pairs, twice because b missed: p = 2 * 0.5^5
    res = paired_test([1, 2, 3, 4, 5], [2, 3, INF, 5, INF])
    assert res["test"] == "sign" and (res["wins_a"], res["wins_b"]) == (5, 0)
    assert res["p"] == pytest.approx(2 * 0.5**5)
    # two misses tie and drop out: 1 win, 1 loss -> p = 1
    res = paired_test([INF, 1.0, 3.0], [INF, 2.0, 2.0])
    assert res["n"] == 3 and res["p"] == pytest.approx(1.0)


def test_mean_ci_is_the_t_interval() -> None:
    xs = [3.0, 5.0, 7.0]
    mean, lo, hi = mean_ci(xs)
    half = stats.t.ppf(0.975, 2) * statistics.stdev(xs) / math.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((5.0, 5.0 - half, 5.0 + half))
    assert mean_ci([1.0, INF]) is None and mean_ci([1.0]) is None


def test_ruleset_override_and_bad_specs_name_the_key(spec_path: Path, tmp_path: Path) -> None:
    spec = with_ruleset(load_spec(spec_path), "self")
    plans = plan_runs(spec, Path("/nonexistent"), "studies")
    assert len(plans) == 3 * 2 * 3 and {p.trial for p in plans} == {"default"}
    assert {p.config.optimizer.lr for p in plans if p.strategy == "sgd"} == {0.3}

    def fails(text: str, match: str) -> None:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_spec(path)

    fails(SPEC.replace("ruleset: external", "ruleset: best"), "tuning.ruleset: expected one of")
    fails(SPEC.replace("trials: 4", "trials: 0"), "tuning.trials")
    fails(SPEC.replace("studies: 3}", "studies: 3}\nseeds: 2"), "tuning.studies")
    fails(
        SPEC.replace("optimizer.lr: {low: 0.01", "optimizer.lrr: {low: 0.01"),
        r"strategies.sgd.search.optimizer.lrr: not a config key",
    )
    fails(
        SPEC.replace(
            "high: 3.0, log: true}}", "high: 3.0, log: true}}\n    tune: {optimizer.lr: [0.1]}"
        ),
        "strategies.sgd: give a search space or a tune grid",
    )
    fails(SPEC.replace("low: 1.0e-4, high: 0.1", "low: -1.0, high: 0.1"), "strategies.adamw.search")
    no_search = "\n".join(
        line
        for line in SPEC.splitlines()
        if "search" not in line and "weight_decay: {low" not in line
    )
    path = tmp_path / "nosearch.yaml"
    path.write_text(no_search.replace("ruleset: external, ", ""))
    with pytest.raises(ConfigError, match="--ruleset: external tuning needs a search space"):
        with_ruleset(load_spec(path), "external")


def test_a_miss_is_put_down_to_the_budget_or_the_method() -> None:
    from cadence.bench.compare import miss_reason

    def rows(values: list[float]) -> list[dict]:
        return [{"step": 10 * (i + 1), "val_loss": v} for i, v in enumerate(values)]

    # target 1.0; from 3.0 at step 30 (3/4 of 40) to 2.5 at 40: 25% of the gap -> budget
    assert miss_reason(rows([5.0, 4.0, 3.0, 2.5]), "val_loss", False, 1.0).startswith("budget")
    # 3.0 -> 2.95 is 2.5% of the gap: stalled
    assert miss_reason(rows([5.0, 4.0, 3.0, 2.95]), "val_loss", False, 1.0).startswith(
        "method: val_loss stalled"
    )
    assert "not finite" in miss_reason(rows([5.0, INF, math.nan]), "val_loss", False, 1.0)
    acc = [{"step": s, "val_accuracy": a} for s, a in ((10, 0.5), (30, 0.8), (40, 0.85))]
    assert miss_reason(acc, "val_accuracy", True, 0.95).startswith("budget")  # +0.05 of 0.15
    assert miss_reason([{"step": 1, "train_loss": 1.0}], "val_loss", False, 1.0) == "no evaluation"
