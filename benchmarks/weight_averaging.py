"""Do weight-averaging readouts win? LAWA and a tail average against the live weights and EMA.

LAWA (Kaddour 2022; Sanyal et al. 2023, "Early weight averaging") evaluates the uniform average
of the last k checkpoints, taken every n steps; a tail average (Polyak-Ruppert, SWA's uniform
average) averages every step from a start point on. Both promise what an LR decay gives without
decaying the LR. This script trains the seed suite's language model with AdamW under three
schedules (constant, cosine, warmup-stable-decay) and, at every evaluation, scores the live
weights, ``train.ema`` (cadence's own readout) and the two averages on the same validation set,
then reports the final and best loss of each and the step each first reaches the target.

    python benchmarks/weight_averaging.py                 # 3 schedules x 2 seeds, 300 steps
    python benchmarks/weight_averaging.py --quick         # smoke: 1 schedule, 1 seed, 40 steps
    python benchmarks/weight_averaging.py --threads 1     # one torch thread (default: every core)

The averages live in a callback that copies weights (no change to the run): LAWA keeps k
float32 snapshots, the tail average is ``torch.optim.swa_utils.AveragedModel``.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

import cadence
from cadence.runtime.events import Callback
from cadence.training.ema import weights_applied

BASE = [
    "workload=lm",
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.seq_len=64",
    "data.max_bytes=1000000",
    "optimizer.name=adamw",
    "optimizer.weight_decay=0.0",
    "batch.size=32",
    "train.clip_grad_norm=1.0",
    "train.eval_samples=128",
    "train.progress=false",
    "train.ema=0.99",
]
SCHEDULES = {
    "constant": ["schedule.name=constant", "schedule.warmup=0.1"],
    "cosine": ["schedule.name=cosine", "schedule.warmup=0.1", "schedule.min_lr_ratio=0.1"],
    "wsd": ["schedule.name=wsd", "schedule.warmup=0.1", "schedule.decay_fraction=0.2"],
}


class Averages(Callback):
    """LAWA and a tail average of the trained weights, scored at every evaluation."""

    def __init__(self, k: int, every: int, tail_start: int) -> None:
        self.k, self.every, self.tail_start = k, every, tail_start
        self.snapshots: collections.deque[list[torch.Tensor]] = collections.deque(maxlen=k)
        self.tail: AveragedModel | None = None
        self.rows: list[dict[str, float]] = []

    def on_step(self, trainer: Any) -> None:
        step, model = trainer.state.step, trainer.model
        if step % self.every == 0:
            self.snapshots.append([p.detach().float().clone() for p in model.parameters()])
        if step >= self.tail_start:
            if self.tail is None:
                self.tail = AveragedModel(model, use_buffers=False)
            else:
                self.tail.update_parameters(model)

    def _score(self, trainer: Any, weights: list[torch.Tensor]) -> float:
        model = trainer.model
        with weights_applied(model, weights), torch.no_grad():
            model.eval()
            try:
                return float(trainer.workload.evaluate(model)["val_loss"])
            finally:
                model.train()

    def on_eval(self, trainer: Any, metrics: dict[str, float]) -> None:
        row = {"step": trainer.state.step, "live": metrics["val_loss"]}
        row["ema"] = metrics.get("ema_val_loss", float("nan"))
        if self.snapshots:
            lawa = [torch.stack(ws).mean(0) for ws in zip(*self.snapshots, strict=True)]
            row["lawa"] = self._score(trainer, lawa)
        if self.tail is not None:
            row["tail"] = self._score(trainer, list(self.tail.module.parameters()))
        self.rows.append(row)


def run(schedule: str, seed: int, lr: float, args: argparse.Namespace) -> list[dict[str, float]]:
    sets = [
        *BASE,
        *SCHEDULES[schedule],
        f"optimizer.lr={lr}",
        f"train.max_steps={args.steps}",
        f"train.eval_every={args.eval_every}",
        f"train.seed={seed}",
    ]
    cb = Averages(args.k, args.every, tail_start=args.steps // 2)
    with tempfile.TemporaryDirectory() as run_dir:
        cadence.train(cadence.load_config(None, sets), run_dir=run_dir, callbacks=[cb], plots=False)
    return cb.rows


def first_step(rows: list[dict[str, float]], key: str, target: float) -> int | None:
    return next((int(r["step"]) for r in rows if r.get(key, float("inf")) <= target), None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedules", default="constant,cosine,wsd")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lr", type=float, default=0.006, help="the seed suite's hand-set AdamW LR")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--k", type=int, default=6, help="LAWA: snapshots averaged")
    ap.add_argument("--every", type=int, default=10, help="LAWA: steps between snapshots")
    ap.add_argument("--target", type=float, default=2.5, help="the seed suite's lm target")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.quick:
        args.schedules, args.seeds, args.steps, args.eval_every = "constant", "0", 40, 10
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2)))
    load_before = os.getloadavg()
    readouts = ("live", "ema", "lawa", "tail")
    results: dict[str, Any] = {"runs": {}}
    print(
        f"| schedule | seed | {' | '.join(f'{r} final / best / steps to {args.target}' for r in readouts)} |"
    )
    print("|---|---|" + "---|" * len(readouts))
    for schedule in args.schedules.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows = run(schedule, seed, args.lr, args)
            results["runs"][f"{schedule}/seed{seed}"] = rows
            cells = []
            for r in readouts:
                vals = [x[r] for x in rows if r in x]
                hit = first_step(rows, r, args.target)
                cells.append(
                    f"{vals[-1]:.4f} / {min(vals):.4f} / {hit if hit is not None else 'miss'}"
                    if vals
                    else "-"
                )
            print(f"| {schedule} | {seed} | {' | '.join(cells)} |", flush=True)
    results |= {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "load": [load_before, os.getloadavg()],
        "args": vars(args),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"weight_averaging-{dt.date.today().isoformat()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
    print(f"wrote {path}; load {load_before} -> {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
