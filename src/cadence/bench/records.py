"""One finished run of a comparison as a record of numbers: what it reached, when, at what cost,
and, for a miss, why."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from cadence.bench.profiles import INF, time_to_target
from cadence.bench.spec import RunPlan

__all__ = ["miss_reason", "run_record"]


def run_record(plan: RunPlan) -> dict[str, Any]:
    """Every number of one finished run, with infinities for a miss (JSON gets null)."""
    rec: dict[str, Any] = {
        "strategy": plan.strategy,
        "workload": plan.workload,
        "seed": plan.seed,
        "trial": plan.trial,
        "params": plan.params,
        "run_dir": str(plan.run_dir),
    }
    summary_path = plan.run_dir / "summary.json"
    if not summary_path.is_file():
        error = plan.run_dir / "error.txt"
        rec.update(
            reached=False,
            error=error.read_text().strip() if error.is_file() else "no summary.json",
            **{f"{k}_to_target": INF for k in ("steps", "samples", "tokens", "time", "cpu")},
            final_metric=None,
            best_metric=None,
            steps=0,
            wall_time_s=None,
            stop_reason=None,
        )
        return rec
    from cadence.track.metrics import read_metrics

    summary = json.loads(summary_path.read_text())
    rows = read_metrics(plan.run_dir / "metrics.jsonl")
    ttt = time_to_target(rows, summary.get("target_step"))
    metric = summary["metric"]
    rec.update(
        reached=summary.get("target_step") is not None,
        error=None,
        **{f"{k}_to_target": v for k, v in ttt.items()},
        metric=metric,
        higher_is_better=summary["higher_is_better"],
        final_metric=(summary.get("final_metrics") or {}).get(metric),
        best_metric=summary.get("best_metric"),
        steps=summary["steps"],
        samples=summary["samples"],
        tokens=summary["tokens"],
        wall_time_s=summary["wall_time_s"],
        cpu_time_s=summary.get("cpu_time_s"),
        stop_reason=summary.get("stop_reason"),
        miss=None
        if summary.get("target_step") is not None
        else miss_reason(rows, metric, summary["higher_is_better"], summary.get("target")),
    )
    return rec


def miss_reason(
    rows: Sequence[dict[str, Any]], metric: str, higher: bool, target: float | None
) -> str:
    """Why a run missed its target: the budget (still closing in at the end) or the method
    (diverged, or stalled over the last quarter of the run).

    "Still closing in" means the last evaluation gained more than 5 % of the remaining gap to
    the target over the evaluation three quarters of the way through.
    """
    vals = [(r["step"], r[metric]) for r in rows if r.get(metric) is not None]
    if not vals:
        return "no evaluation"
    last_step, last = vals[-1]
    if not math.isfinite(last):
        return f"method: {metric} not finite at step {last_step}"
    ref = min(vals, key=lambda v: abs(v[0] - 0.75 * last_step))[1]
    sign = 1.0 if higher else -1.0
    gained = sign * (last - ref)
    gap = abs(ref - target) if target is not None else abs(ref)
    if ref != last and gained > 0.05 * gap:
        return f"budget: {metric} still improving at the end ({ref:.4g} -> {last:.4g})"
    return f"method: {metric} stalled at {last:.4g} over the last quarter"
