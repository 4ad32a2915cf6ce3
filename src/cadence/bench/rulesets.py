"""Tuning rulesets of a comparison: who gets tuned, how much, and what a study's result is.

The rules follow AlgoPerf's (Dahl et al., 2023), scaled to one machine:

- ``external``: every strategy with a search space gets the same budget, ``trials`` points per
  study drawn from its own space, in ``studies`` independent studies. A study's result is its
  fastest trial (a miss is infinite); a strategy's result is the median over studies. A
  strategy without a search space runs once per study at its own settings (it is *self-tuned*:
  it gets less tuning, never more).
- ``self``: no tuning; each study is one run at the strategy's own settings. For strategies that
  choose their own learning rate (schedule-free, ``optimizer.lr: auto``).
- ``grid``: the older rule, kept for specs with a ``tune`` grid: every grid point on the first
  seed, then the chosen point on the other seeds.

A study is a seed: study ``i`` trains every trial with ``train.seed = seeds[i]`` and draws its
points with the same seed, so studies are independent of each other, and two strategies in the
same study see the same data order (which is what makes the paired test across studies paired).

Points are quasi-random (scrambled Halton, ``scipy.stats.qmc``), as in AlgoPerf's baselines:
with a handful of trials, a low-discrepancy sequence covers a log-LR range evenly where
independent draws often bunch up. Trials are decided up front, so every trial of every study
runs in parallel under ``--jobs``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cadence.tune.space import Param, thaw

__all__ = ["RULESETS", "sample_points", "study_bests", "trial_key"]

RULESETS = ("external", "self", "grid")


def sample_points(params: Sequence[Param], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` points of a search space, scrambled Halton seeded by ``seed`` (the study).

    Strategies with spaces of the same dimension get the same unit-cube points in a study, so
    no strategy is dealt a luckier sequence than another.
    """
    if not params:
        return [{} for _ in range(n)]
    from scipy.stats import qmc

    unit = qmc.Halton(d=len(params), scramble=True, rng=seed).random(n)
    return [{p.key: _scale(p, float(u[i])) for i, p in enumerate(params)} for u in unit]


def _scale(p: Param, u: float) -> Any:
    """A point of the unit interval to a value of one parameter."""
    if p.kind == "categorical":
        return thaw(p.choices[min(int(u * len(p.choices)), len(p.choices) - 1)])
    assert p.low is not None and p.high is not None
    if p.kind == "int":
        return min(int(p.low + math.floor(u * (p.high - p.low + 1))), int(p.high))
    if p.log:
        return float(math.exp(math.log(p.low) + u * (math.log(p.high) - math.log(p.low))))
    value = p.low + u * (p.high - p.low)
    if p.step:
        value = p.low + round((value - p.low) / p.step) * p.step
    return float(min(value, p.high))


def trial_key(record: dict[str, Any], by: str, higher: bool) -> tuple[float, float, float]:
    """Order of trials in a study: first to the target on the primary measure, then on steps,
    then (for misses) the best metric reached."""
    best = record.get("best_metric")
    metric = math.inf if best is None else (-best if higher else best)
    return (record[f"{by}_to_target"], record["steps_to_target"], metric)


def study_bests(
    records: Sequence[dict[str, Any]], by: str, higher: dict[str, bool]
) -> list[dict[str, Any]]:
    """The fastest trial of every (strategy, workload, study), with the study's size.

    ``higher[workload]`` says whether the workload's metric is better high. A study whose every
    trial missed is represented by its best miss, so its time stays infinite.
    """
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["strategy"], r["workload"], r["seed"]), []).append(r)
    out = []
    for (_, w, _), trials in groups.items():
        best = min(trials, key=lambda r: trial_key(r, by, higher.get(w, False)))
        reached = [r for r in trials if r["reached"]]
        out.append({**best, "study_trials": len(trials), "study_reached": len(reached)})
    return out
