"""Does the learning rate transfer across width? Loss against LR at several widths, SP vs μP.

For each parametrization (``model.parametrization: sp`` and ``mup``, base width 64) and each
width, the same short AdamW run of cadence's GPT on the default corpus is trained at every LR of
a log grid, and its final validation loss is recorded. Under SP the best LR moves down as the
model widens (a hidden matrix's Adam update is summed over a fan-in that grows); under μP it
should stay put, so the LR found at the narrowest width is the one to use at every width.

Then the claim a user cares about: ``cadence tune`` on the narrowest μP model picks an LR, and
that LR is trained at the widest width under both parametrizations and compared with the best
loss the grid found there.

    python benchmarks/mup_transfer.py                       # widths 64,128,256; 8 LRs
    python benchmarks/mup_transfer.py --widths 64,128,256,512 --steps 200
    python benchmarks/mup_transfer.py --quick               # smoke: 2 widths, 3 LRs, 10 steps

Writes ``benchmarks/results/mup_transfer-<date>.json`` and ``.png`` (``--out DIR``); every run is
appended to the JSON as it finishes, so a stopped sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import cadence


def _overrides(width: int, parametrization: str, lr: float, args: argparse.Namespace) -> list[str]:
    return [
        "optimizer.name=adamw",
        f"optimizer.lr={lr}",
        "optimizer.weight_decay=0.1",
        "optimizer.betas=[0.9,0.95]",
        "schedule.name=cosine",
        "schedule.warmup=0.1",
        f"model.d_model={width}",
        f"model.n_layer={args.n_layer}",
        "model.n_head=4",
        f"model.seq_len={args.seq_len}",
        f"model.parametrization={parametrization}",
        f"model.base_width={args.base_width}",
        f"batch.size={args.batch}",
        f"train.max_steps={args.steps}",
        f"train.eval_every={args.steps}",
        "train.eval_samples=256",
        "train.progress=false",
        f"train.checkpoint_every={args.steps}",
        f"train.seed={args.seed}",
        *args.set,
    ]


def _train(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = cadence.load_config("default", overrides=overrides)
        summary = cadence.train(cfg, run_dir=run_dir, plots=False)  # a temporary run
    loss = summary["final_metrics"]["val_loss"]
    return {"val_loss": loss if math.isfinite(loss) else None, "wall_s": summary["wall_time_s"]}


def _tune_lr(width: int, args: argparse.Namespace, out: Path) -> float:
    """``cadence tune`` over optimizer.lr alone on the narrow μP proxy; its best LR."""
    space = out / "mup_transfer_space.yaml"
    space.write_text(
        yaml.safe_dump({"optimizer.lr": {"low": args.lrs[0], "high": args.lrs[-1], "log": True}})
    )
    run_dir = Path(tempfile.mkdtemp(prefix="mup-tune-"))
    sets = [x for o in _overrides(width, "mup", args.lrs[0], args) for x in ("--set", o)]
    cmd = [
        sys.executable,
        "-m",
        "cadence",
        "tune",
        "--trials",
        str(args.tune_trials),
        "--space",
        str(space),
    ]
    cmd += ["--pruner", "none", "--run-dir", str(run_dir), *sets]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    space.unlink()
    best = yaml.safe_load((run_dir / "best.yaml").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    return float(best["optimizer"]["lr"])


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, p in zip(axes, ("sp", "mup"), strict=True):
        for w in result["widths"]:
            rows = [r for r in result["runs"] if r["parametrization"] == p and r["width"] == w]
            rows = [r for r in rows if r["val_loss"] is not None]
            if not rows:
                continue
            (line,) = ax.plot([r["lr"] for r in rows], [r["val_loss"] for r in rows], "o-")
            line.set_label(f"d_model {w}")
            best = min(rows, key=lambda r: r["val_loss"])
            ax.plot([best["lr"]], [best["val_loss"]], "*", ms=14, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("AdamW learning rate")
        title = (
            "standard parametrization" if p == "sp" else f"μP (base width {result['base_width']})"
        )
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel(f"validation loss after {result['steps']} steps")
    finite = [r["val_loss"] for r in result["runs"] if r["val_loss"] is not None]
    if finite:
        lo = min(finite)
        axes[0].set_ylim(lo - 0.05, min(max(finite), lo + 1.5))
    fig.suptitle("Does the best LR move with width?  (star: best LR at each width)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def _write(result: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def _best(result: dict, p: str, w: int) -> dict | None:
    rows = [
        r
        for r in result["runs"]
        if r["parametrization"] == p and r["width"] == w and r["val_loss"] is not None
    ]
    return min(rows, key=lambda r: r["val_loss"]) if rows else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,128,256")
    ap.add_argument("--lrs", default="", help="comma-separated; default 2^-13 .. 2^-6")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--base-width", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tune-trials", type=int, default=8, help="0 skips the tune-and-transfer")
    ap.add_argument("--set", action="append", default=[], help="an extra override (repeatable)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.steps, args.tune_trials = "64,128", 10, 2
        args.lrs = args.lrs or "1e-3,4e-3,1.6e-2"
    args.lrs = sorted(
        float(x) for x in (args.lrs.split(",") if args.lrs else [2.0**e for e in range(-13, -5)])
    )
    widths = [int(w) for w in args.widths.split(",")]
    if args.tune_trials and len(args.lrs) < 2:
        ap.error("--lrs: the tune searches between the smallest and the largest; give two or more")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.date.today().isoformat()
    json_path, png_path = out / f"mup_transfer-{stamp}.json", out / f"mup_transfer-{stamp}.png"
    result: dict = {
        "date": stamp,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus",
        "load_before": os.getloadavg(),
        "widths": widths,
        "lrs": args.lrs,
        "steps": args.steps,
        "base_width": args.base_width,
        "setup": {k: v for k, v in vars(args).items() if k not in ("widths", "lrs", "out")},
        "overrides": _overrides(widths[-1], "mup", args.lrs[0], args),
        "runs": [],
    }
    t0 = time.perf_counter()
    for w in widths:
        for p in ("sp", "mup"):
            for lr in args.lrs:
                row = {"parametrization": p, "width": w, "lr": lr}
                row |= _train(_overrides(w, p, lr, args))
                result["runs"].append(row)
                _write(result, json_path)
                print(f"{p:3s} d_model {w:4d} lr {lr:.2e}  val_loss {row['val_loss']}", flush=True)
    print(f"\nbest LR per width ({time.perf_counter() - t0:.0f} s):")
    print(f"{'width':>6s} {'SP best lr':>11s} {'SP loss':>8s} {'μP best lr':>11s} {'μP loss':>8s}")
    for w in widths:
        sp, mup = _best(result, "sp", w), _best(result, "mup", w)
        cells = [
            f"{b['lr']:11.2e} {b['val_loss']:8.4f}" if b else f"{'-':>11s} {'-':>8s}"
            for b in (sp, mup)
        ]
        print(f"{w:6d} {cells[0]} {cells[1]}")
    if args.tune_trials:
        lr = _tune_lr(widths[0], args, out)
        wide = widths[-1]
        transfer = {"tuned_at": widths[0], "lr": lr, "trained_at": wide}
        for p in ("sp", "mup"):
            transfer[p] = _train(_overrides(wide, p, lr, args))["val_loss"]
            best = _best(result, p, wide)
            transfer[f"{p}_grid_best"] = best["val_loss"] if best else None
        result["transfer"] = transfer
        print(
            f"\ncadence tune at d_model {widths[0]} (μP, {args.tune_trials} trials): lr {lr:.2e}; "
            f"trained at d_model {wide}: μP {transfer['mup']:.4f} (grid best "
            f"{transfer['mup_grid_best']:.4f}), SP {transfer['sp']:.4f} (grid best "
            f"{transfer['sp_grid_best']:.4f})"
        )
    result["load_after"] = os.getloadavg()
    result["total_s"] = time.perf_counter() - t0
    _write(result, json_path)
    _plot(result, png_path)
    print(
        f"wrote {json_path} and {png_path}; load {result['load_before']} -> {result['load_after']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
