"""What ``torch.compile`` costs and gives on the default recipe's GPT: whole model vs per block.

    python benchmarks/compile.py                 # 40 measured steps, 2 rounds
    python benchmarks/compile.py --steps 20 --rounds 1

Each (variant, round) runs in a fresh process so no in-memory compile cache carries over; the
inductor on-disk cache is a scratch folder shared by the rounds, so round 1 is a cold compile and
round 2 what a second run of the same model pays. Variants, interleaved in each round:

- ``eager``: the model as it is;
- ``whole``: ``torch.compile(model)``;
- ``regional``: ``block.compile()`` on each Transformer block (torchtitan's per-block compile:
  the blocks share one compiled graph, so compile time does not grow with depth).

Every step is forward + backward + AdamW on the same batches. Reported per variant: the first
step's time over eager's (the compile cost), the median step time and its ratio to eager.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from overhead import loadavg

WORKER = "--worker"


def worker(variant: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    import cadence
    from cadence.config.parts import optimizer_from
    from cadence.workloads import build_workload

    cfg = cadence.load_config(None, [])
    torch.manual_seed(0)
    w = build_workload(cfg)
    model = w.model
    if variant == "whole":
        step_model = torch.compile(model)
    else:
        step_model = model
        if variant == "regional":
            for block in model.blocks:
                block.compile()
    opt = optimizer_from(cfg, model)
    sampler = w.sampler(cfg.train.seed)
    size = int(cfg.batch.size)
    times, loss = [], None
    for k in range(steps + 1):
        x, y = w.batch(sampler.indices(k * size, size))
        t0 = time.perf_counter()
        logits = step_model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.item()
        times.append(time.perf_counter() - t0)
    return {"first_s": times[0], "step_s": statistics.median(times[1:]), "loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(WORKER, nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return
    import torch

    print(
        f"compile benchmark {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, load {loadavg()}"
    )
    variants = ["eager", "whole", "regional"]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache}
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                out = subprocess.run(
                    [sys.executable, __file__, WORKER, v, str(args.steps)],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=Path(__file__).parent,
                )
                if out.returncode != 0:
                    print(f"  round {r + 1} {v}: failed: {out.stderr.strip().splitlines()[-1]}")
                    continue
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results[v].append(res)
                print(
                    f"  round {r + 1} {v:9s} first step {res['first_s']:7.2f} s, "
                    f"median step {res['step_s'] * 1e3:6.1f} ms, loss {res['loss']:.4f}"
                )
    eager = statistics.median(r["step_s"] for r in results["eager"])
    print(f"\n{'variant':10s} {'compile s (round 1 / 2)':>26s} {'ms/step':>8s} {'vs eager':>9s}")
    for v in variants:
        rs = results[v]
        if not rs:
            continue
        step = statistics.median(r["step_s"] for r in rs)
        comp = " / ".join(f"{r['first_s'] - r['step_s']:.1f}" for r in rs)
        print(f"{v:10s} {comp:>26s} {step * 1e3:8.1f} {eager / step:8.3f}x")
    print(f"load after: {loadavg()}")


if __name__ == "__main__":
    main()
