"""Scaling efficiency from 1 to N processes: the same config through `cadence train`.

Runs the default recipe (or CONFIG) for a fixed number of steps as one process and as
`--nproc N` (DDP or FSDP2 through torchrun), interleaved over repeats so machine noise cancels,
and prints tokens/s from each run's summary.json with the ratios measured side by side.

    python benchmarks/scaling.py [CONFIG] [--nproc 2] [--steps 40] [--repeats 2]
        [--distributed ddp|fsdp] [--set KEY=VALUE ...]

Comparing the efficiency of `--set optimizer.name=muon` with the default AdamW under
`--distributed fsdp` measures what Muon's whole-matrix gather costs when sharded.
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


def run(
    config: str | None, steps: int, nproc: int, threads: int, out: Path, sets: list[str]
) -> float:
    cmd = [sys.executable, "-m", "cadence", "train", *([config] if config else [])]
    for item in sets:
        cmd += ["--set", item]
    cmd += ["--run-dir", str(out), "--set", f"train.max_steps={steps}"]
    cmd += ["--set", "train.eval_every=100000", "--set", "train.progress=false"]
    cmd += ["--set", f"train.threads={threads}", "--set", "schedule.warmup=0"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise SystemExit(f"{' '.join(cmd)}\nexited {proc.returncode}:\n{tail}")
    summary = json.loads((out / "summary.json").read_text())
    return summary["tokens_per_s"] or summary["samples_per_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default=None)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--distributed", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    args = ap.parse_args()
    sets = [f"train.distributed={args.distributed}", *args.sets]
    mode = args.distributed.upper()
    cores = os.cpu_count() or 1
    variants = {
        "1 process, 1 thread": (1, 1),
        f"1 process, {args.nproc} threads": (1, args.nproc),
        f"{args.nproc} processes ({mode}), 1 thread each": (args.nproc, 1),
    }
    print(f"cadence scaling benchmark  {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{platform.processor() or platform.machine()}, {cores} cores, {args.steps} steps")
    print(f"settings: {' '.join(sets)}")
    rates: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                nproc, threads = variants[name]
                out = Path(tmp) / f"{r}-{nproc}-{threads}"
                rates[name].append(run(args.config, args.steps, nproc, threads, out, sets))
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
