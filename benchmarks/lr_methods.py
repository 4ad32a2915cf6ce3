"""How good are `cadence find-lr` and `cadence tune` against a plain LR grid, and what do they cost?

On each workload (mnist, lm at the seed suite's sizes, AdamW + warmup + cosine), the same
trainer runs:

- a grid: ``--grid`` log-spaced learning rates, each trained for the full budget; the best
  validation metric's LR is the reference, and the grid's optimizer steps are the unit of cost;
- the LR range test (`lr_range_test`, as `cadence find-lr`): its suggestion, the steps it took,
  and the validation metric of a full run at the suggestion;
- an Optuna sweep (`run_sweep`, as `cadence tune`, median pruner) over the grid's range with as
  many trials as grid points: its best LR and the steps it trained (pruned trials stop early).

Prints one table: each method's LR, its ratio to the grid's best, the metric it reaches, and its
compute relative to the grid. Run: ``python benchmarks/lr_methods.py [--workloads mnist,lm]``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import cadence
from cadence.config import Config, parse_config
from cadence.tune.lr_finder import lr_range_test
from cadence.tune.sweep import run_sweep
from cadence.workloads import build_workload

SETTINGS = {
    "mnist": [
        "workload=mnist",
        "model.arch=mlp",
        "model.hidden=[128]",
        "train.max_steps=500",
        "train.eval_every=50",
    ],
    "lm": [
        "workload=lm",
        "model.n_layer=2",
        "model.d_model=64",
        "model.n_head=4",
        "model.seq_len=64",
        "data.max_bytes=1000000",
        "train.max_steps=300",
        "train.eval_every=50",
        "train.eval_samples=128",
        "train.clip_grad_norm=1.0",
    ],
}
COMMON = [
    "optimizer.name=adamw",
    "optimizer.weight_decay=0.0",
    "batch.size=32",
    "schedule.name=cosine",
    "schedule.warmup=30",
    "schedule.min_lr_ratio=0.1",
    "train.threads=1",
    "train.progress=false",
    "train.log_every=50",
]


EXTRA: list[str] = []  # --max-steps (the tests' tiny run)


def _cfg(workload: str, lr: float) -> Config:
    return parse_config(None, SETTINGS[workload] + COMMON + EXTRA + [f"optimizer.lr={lr}"])


def _train(workload: str, lr: float, root: Path) -> dict[str, Any]:
    run = root / f"{workload}-lr{lr:.3g}-{time.monotonic_ns()}"
    return cadence.train(_cfg(workload, lr), run_dir=run, plots=False)


def _score(summary: dict[str, Any]) -> float:
    """The final validation metric, oriented so lower is better."""
    value = (summary.get("final_metrics") or {}).get(summary["metric"], math.nan)
    return -value if summary["higher_is_better"] else value


def one_workload(
    workload: str, grid_n: int, low: float, high: float, root: Path
) -> list[list[str]]:
    grid = np.geomspace(low, high, grid_n)
    grid_runs = [(lr, _train(workload, float(lr), root)) for lr in grid]
    grid_steps = sum(s["steps"] for _, s in grid_runs)
    best_lr, best = min(grid_runs, key=lambda x: _score(x[1]))
    metric = best["metric"]

    def row(method: str, lr: float, summary: dict[str, Any], steps: int, wall: float) -> list[str]:
        value = (summary.get("final_metrics") or {}).get(metric, math.nan)
        return [
            workload,
            method,
            f"{lr:.3g}",
            f"{lr / best_lr:.2f}",
            f"{metric} {value:.4g}",
            f"{steps:,}",
            f"{steps / grid_steps:.2f}",
            f"{wall:.0f}s",
        ]

    rows = [row(f"grid ({grid_n} LRs)", float(best_lr), best, grid_steps, 0.0)]
    rows[0][-1] = f"{sum(s['wall_time_s'] for _, s in grid_runs):.0f}s"

    t0 = time.perf_counter()
    cfg = _cfg(workload, float(best_lr))
    found = lr_range_test(cfg, build_workload(cfg))
    wall = time.perf_counter() - t0
    at = _train(workload, found.suggestion, root)
    rows.append(row("find-lr (range test)", found.suggestion, at, found.steps, wall))

    t0 = time.perf_counter()
    space = {"optimizer.lr": {"low": float(low), "high": float(high), "log": True}}
    result = run_sweep(
        cfg, space, trials=grid_n, out_dir=root / f"tune-{workload}", metric=metric, sampler_seed=0
    )
    wall = time.perf_counter() - t0
    tuned_lr = float(result.best_params["optimizer.lr"])
    at = _train(workload, tuned_lr, root)
    rows.append(
        row(f"tune ({grid_n} trials, median pruner)", tuned_lr, at, result.total_steps, wall)
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="mnist,lm")
    ap.add_argument("--grid", type=int, default=7, help="grid points (and tune trials)")
    ap.add_argument("--low", type=float, default=1e-4)
    ap.add_argument("--high", type=float, default=1e-1)
    ap.add_argument("--max-steps", type=int, default=None, help="override the step budget")
    args = ap.parse_args()
    if args.max_steps:
        EXTRA.extend([f"train.max_steps={args.max_steps}", "schedule.warmup=5"])
    print(f"load before: {os.getloadavg()[0]:.2f}")
    header = [
        "workload",
        "method",
        "LR",
        "/ grid best",
        "final metric at that LR",
        "optimizer steps",
        "/ grid",
        "wall",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workloads.split(","):
            rows += one_workload(w, args.grid, args.low, args.high, Path(tmp))
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
