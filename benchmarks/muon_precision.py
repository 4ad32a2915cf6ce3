"""Muon's Newton–Schulz in bfloat16 (torch's) and in float32 (cadence's choice on CPU), side by side.

    python benchmarks/muon_precision.py              # 3 interleaved rounds of 50 steps each
    python benchmarks/muon_precision.py --threads 2

Reported, all measured in this run:
* the matmul rate of an n x n product in float32 and in bfloat16 (n = 256, 512): whether this CPU
  has bf16 matrix units (AMX, AVX512-BF16) or runs bf16 on a slow path;
* the median Muon step on the default recipe's GPT matrices (its 16 hidden matrices, gradients
  flipping sign every step) with torch.optim.Muon (bf16 iteration) and with cadence's ShardedMuon
  at ns_dtype=float32, per round and the median of rounds, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from optim_step import step_time
from overhead import hardware, loadavg, matmul_rate

import cadence
from cadence.optim.groups import muon_split
from cadence.optim.sharded import ShardedMuon
from cadence.workloads import build_workload

HYPER = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "adjust_lr_fn": "match_rms_adamw"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    hw = hardware(cpu)
    print(f"# muon_precision: {hw['cpu']}, torch {hw['torch']}, {args.threads} thread(s)")
    print(f"load before {loadavg()}\n")
    print("| n | float32 GFLOP/s | bfloat16 GFLOP/s | bf16 / fp32 |\n|---:|---:|---:|---:|")
    for n in (256, 512):
        f32 = matmul_rate(n, 10, cpu, torch.float32)
        b16 = matmul_rate(n, 10, cpu, torch.bfloat16)
        print(f"| {n} | {f32 / 1e9:.1f} | {b16 / 1e9:.1f} | {b16 / f32:.3f} |")

    model = build_workload(cadence.load_config(None, ["train.progress=false"])).model
    matrices, _ = muon_split(model)
    torch.manual_seed(0)
    variants = {}
    for name, make in (
        ("torch Muon (bf16)", lambda ps: torch.optim.Muon(ps, **HYPER)),
        ("cadence Muon (fp32)", lambda ps: ShardedMuon(ps, ns_dtype=torch.float32, **HYPER)),
    ):
        params = [torch.nn.Parameter(m.detach().clone()) for m in matrices]
        for p in params:
            p.grad = torch.randn_like(p)
        variants[name] = make(params)
    shapes = sorted({tuple(m.shape) for m in matrices})
    print(
        f"\n{len(matrices)} matrices of shapes {shapes}, {args.steps} steps x {args.rounds} rounds"
    )
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):  # interleaved, so drifting load hits both alike
        for name, opt in variants.items():
            rounds[name].append(step_time(opt, args.steps))
    print("\n| variant | step ms per round | median ms |\n|---|---|---:|")
    med = {}
    for name, times in rounds.items():
        med[name] = statistics.median(times)
        cells = ", ".join(f"{t * 1e3:.2f}" for t in times)
        print(f"| {name} | {cells} | {med[name] * 1e3:.2f} |")
    ratio = med["torch Muon (bf16)"] / med["cadence Muon (fp32)"]
    print(f"\ntorch bf16 / cadence fp32 step time: {ratio:.2f}x")
    print(f"load after {loadavg()}")


if __name__ == "__main__":
    main()
