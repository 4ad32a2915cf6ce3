"""Time-to-target statistics and performance profiles, as pure functions of numbers.

These follow the AlgoPerf benchmark (Dahl et al., 2023, "Benchmarking Neural Network Training
Algorithms"): a run that misses its target takes infinite time; a strategy's time on a workload is
the median over seeds; its *performance ratio* there is that time over the best strategy's; the
*performance profile* rho_s(tau) is the fraction of workloads with ratio <= tau; and the score is
the area under rho_s on [1, tau_max], divided by (tau_max - 1) so a strategy that is fastest
everywhere scores 1 and one that never reaches a target within tau_max scores 0.

Kept free of I/O so they can be checked on hand-built numbers (misses, ties) in unit tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

INF = math.inf

__all__ = [
    "bootstrap_ci",
    "median",
    "performance_profile",
    "performance_ratios",
    "profile_score",
    "time_to_target",
]


def time_to_target(rows: Sequence[Mapping[str, Any]], target_step: int | None) -> dict[str, float]:
    """Steps, samples, tokens, training time and CPU time at the step the target was reached.

    ``rows`` are a run's metrics.jsonl rows; the trainer records ``target_step`` at the
    evaluation that reached the target, and evaluation steps are always logged, so the counters
    are read from that row. Time is ``train_time_s``: wall time less the time spent evaluating
    and checkpointing, which depend on the benchmark's cadence, not on the strategy (rows
    written before that field existed fall back to ``time_s``); ``cpu`` is the same on the
    process's CPU clock (``train_cpu_s``; wall time for rows from before it existed). A miss
    (``target_step`` None) is infinite on every measure.
    """
    if target_step is None:
        return {"steps": INF, "samples": INF, "tokens": INF, "time": INF, "cpu": INF}
    row = next((r for r in rows if r.get("step") == target_step), None)
    if row is None:  # not logged (should not happen): the nearest later row bounds it
        later = [r for r in rows if r.get("step", -1) >= target_step]
        row = min(later, key=lambda r: r["step"]) if later else {}
    tokens = row.get("tokens")
    wall = float(row.get("train_time_s", row.get("time_s", INF)))
    return {
        "steps": float(target_step),
        "samples": float(row.get("samples", INF)),
        "tokens": float(tokens) if tokens else INF,
        "time": wall,
        "cpu": float(row.get("train_cpu_s", wall)),
    }


def median(values: Sequence[float]) -> float:
    """Median where inf is an ordinary, largest value: more than half misses -> inf."""
    xs = sorted(values)
    if not xs:
        return INF
    n = len(xs)
    if n % 2:
        return xs[n // 2]
    lo, hi = xs[n // 2 - 1], xs[n // 2]
    return INF if math.isinf(hi) else (lo + hi) / 2


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median over seeds.

    Quantiles are taken by rank (no interpolation), so infinite times stay infinite instead of
    turning into NaN. With few seeds the interval is wide and coarse: it is a spread, not a test.
    """
    xs = np.asarray(list(values), dtype=float)
    if xs.size == 0:
        return INF, INF
    if xs.size == 1:
        return float(xs[0]), float(xs[0])
    rng = np.random.default_rng(seed)
    samples = xs[rng.integers(0, xs.size, size=(n_boot, xs.size))]
    meds = np.sort([median(list(s)) for s in samples])
    alpha = (1 - level) / 2
    lo = meds[int(math.floor(alpha * (n_boot - 1)))]
    hi = meds[int(math.ceil((1 - alpha) * (n_boot - 1)))]
    return float(lo), float(hi)


def performance_ratios(
    times: Mapping[str, Mapping[str, float]], workloads: Sequence[str]
) -> dict[str, dict[str, float]]:
    """``times[strategy][workload]`` -> ratio to the fastest strategy on each workload.

    A missing entry (strategy not run there) or a miss is inf. When no strategy reaches the
    target on a workload, every ratio there is inf: nobody gets credit for it.
    """
    out: dict[str, dict[str, float]] = {s: {} for s in times}
    for w in workloads:
        best = min((times[s].get(w, INF) for s in times), default=INF)
        for s in times:
            t = times[s].get(w, INF)
            if math.isinf(best) or math.isinf(t) or math.isnan(t):
                out[s][w] = INF
            elif best <= 0:
                out[s][w] = 1.0 if t <= 0 else INF
            else:
                out[s][w] = t / best
    return out


def performance_profile(ratios: Mapping[str, float], taus: Sequence[float]) -> list[float]:
    """rho(tau): the fraction of workloads on which the strategy is within a factor tau."""
    rs = list(ratios.values())
    if not rs:
        return [0.0 for _ in taus]
    return [sum(r <= tau for r in rs) / len(rs) for tau in taus]


def profile_score(ratios: Mapping[str, float], tau_max: float = 4.0) -> float:
    """Area under rho on [1, tau_max] over (tau_max - 1), computed exactly.

    rho is a step function, so each workload with ratio r contributes (tau_max - r) / (tau_max -
    1) / n_workloads when r <= tau_max, and nothing otherwise.
    """
    rs = list(ratios.values())
    if not rs:
        return 0.0
    span = tau_max - 1.0
    return sum(max(0.0, tau_max - max(r, 1.0)) for r in rs if r <= tau_max) / span / len(rs)
