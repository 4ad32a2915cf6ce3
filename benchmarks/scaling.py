"""Scaling efficiency from 1 to N processes: the same config through `cadence train`.

Runs the default recipe (or CONFIG) for a fixed number of steps as one process and as
`--nproc N` (DDP through torchrun), interleaved over repeats so machine noise cancels, and prints
tokens/s from each run's summary.json with the ratios measured side by side.

    python benchmarks/scaling.py [CONFIG] [--nproc 2] [--steps 40] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(config: str | None, steps: int, nproc: int, threads: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "cadence", "train", *([config] if config else [])]
    cmd += ["--run-dir", str(out), "--set", f"train.max_steps={steps}"]
    cmd += ["--set", "train.eval_every=100000", "--set", "train.progress=false"]
    cmd += ["--set", f"train.threads={threads}", "--set", "schedule.warmup=0"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return summary["tokens_per_s"] or summary["samples_per_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default=None)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    variants = {
        "1 process, 1 thread": (1, 1),
        f"1 process, {args.nproc} threads": (1, args.nproc),
        f"{args.nproc} processes (DDP), 1 thread each": (args.nproc, 1),
    }
    print(f"cadence scaling benchmark  {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{platform.processor() or platform.machine()}, {cores} cores, {args.steps} steps")
    rates: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                nproc, threads = variants[name]
                out = Path(tmp) / f"{r}-{nproc}-{threads}"
                rates[name].append(run(args.config, args.steps, nproc, threads, out))
                print(f"  repeat {r + 1}: {name:<36} {rates[name][-1]:>10,.0f} /s")
    med = {k: statistics.median(v) for k, v in rates.items()}
    one, threaded, multi = (med[k] for k in variants)
    print(f"\n{'variant':<40}{'median /s':>12}")
    for k, v in med.items():
        print(f"{k:<40}{v:>12,.0f}")
    print(f"\nspeed-up {args.nproc} processes vs 1 process (1 thread): {multi / one:.2f}x")
    print(f"scaling efficiency: {multi / one / args.nproc:.2f}")
    print(f"{args.nproc} processes vs 1 process with {args.nproc} threads: {multi / threaded:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
