"""How long a checkpoint stops training: synchronous against ``train.async_checkpoint``.

A GPT large enough that its checkpoint takes a noticeable time to write (8 blocks of width
512 with AdamW: the weights and two moments, about 300 MB) trains the same steps twice, saving
every few steps, once writing each checkpoint in the loop and once handing it to the
background writer. The stall per checkpoint is the run's ``checkpoint_time_s`` (the time the
loop spent in saves) over the number of saves; the training time beside it shows what the
writer thread costs the steps that overlap it.

``--fsdp``: the same on two processes of this machine under ``train.distributed=fsdp``
(``cadence train --nproc 2``, one thread each), where each rank writes its shards through
torch.distributed.checkpoint: ``save`` in the loop, or ``async_save`` (the loop waits only for
the copy into host memory). The stall is rank 0's, from its summary.json.

    python benchmarks/checkpoint_stall.py                      # 30 steps, a save every 5
    python benchmarks/checkpoint_stall.py --fsdp               # the sharded case, 2 processes
    python benchmarks/checkpoint_stall.py --small --steps 6    # does it run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from machine import header

import cadence

LARGE = ["model.n_layer=8", "model.d_model=512", "model.n_head=8"]
SMALL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "train.eval_samples=16"]


def run(async_: bool, steps: int, every: int, size: list[str], root: Path, fsdp: bool) -> dict:
    overrides = [
        *size,
        "optimizer.name=adamw",
        "batch.size=8",
        f"train.max_steps={steps}",
        f"train.checkpoint_every={every}",
        f"train.eval_every={steps}",
        "train.keep_checkpoints=2",
        "train.compile=false",
        "train.progress=false",
        f"train.async_checkpoint={str(async_).lower()}",
    ]
    run_dir = root / ("async" if async_ else "sync")
    if not fsdp:
        return cadence.train(
            cadence.load_config("default", overrides), run_dir=run_dir, plots=False
        )
    return run_fsdp([*overrides, "train.distributed=fsdp", "train.threads=1"], run_dir)


def run_fsdp(overrides: list[str], run_dir: Path) -> dict:
    """`cadence train --nproc 2` in this process (ranks forked from it on CPU); rank 0's
    summary.json."""
    from cadence.cli import main as cadence_main

    sets = [arg for item in overrides for arg in ("--set", item)]
    rc = cadence_main(["train", *sets, "--run-dir", str(run_dir), "--nproc", "2"])
    if rc != 0:
        raise SystemExit(f"the 2-process run exited {rc}")
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="a one-layer model (a smoke test)")
    parser.add_argument("--fsdp", action="store_true", help="2 processes, sharded checkpoints")
    args = parser.parse_args()
    print(header())
    size = SMALL if args.small else LARGE
    saves = args.steps // args.every  # the last one (at the end) is synchronous in both
    print("| checkpoints | saves | stall per save (s) | training s | wall s |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for async_ in (False, True):
            s = run(async_, args.steps, args.every, size, Path(tmp), args.fsdp)
            label = "background thread" if async_ else "synchronous"
            if args.fsdp:
                label = f"FSDP2, {'DCP async_save' if async_ else 'DCP save'}"
            print(
                f"| {label} | {saves} | {s['checkpoint_time_s'] / saves:.3f} "
                f"| {s['train_time_s']:.1f} | {s['wall_time_s']:.1f} |"
            )
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
