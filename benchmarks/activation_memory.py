"""What `train.activation_checkpointing` saves, and what it costs: the default recipe's GPT, or
any model a config names (`--set model.hf_config=...` for a Hugging Face one).

Memory is counted exactly: every tensor autograd keeps for the backward pass goes through
`torch.autograd.graph.saved_tensors_hooks`, which adds up its bytes (on a GPU the peak of
`torch.cuda.max_memory_allocated` is printed too). Time is the ratio of step times measured side
by side, plain and checkpointed interleaved (A B, B A, ...), so a drift of the machine cancels.

    python benchmarks/activation_memory.py [--recipe default] [--batch 32] [--repeats 5]
    python benchmarks/activation_memory.py --set 'model.hf_config={model_type: llama, ...}'
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from cadence import load_config
from cadence.workloads import build_workload


def step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """One forward/backward; (seconds, bytes saved for backward)."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, saved[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="default")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="interleaved pairs of steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    cfg = load_config(args.recipe, ["data.max_bytes=200000", "train.progress=false", *args.set])
    w = build_workload(cfg)
    model = w.model.train()
    x, y = w.batch(torch.arange(args.batch))
    print(f"load average before: {os.getloadavg()}")
    print(f"model: {sum(p.numel() for p in model.parameters()):,} params; batch {tuple(x.shape)}")
    step(model, x, y)  # warm up both paths once
    model.set_activation_checkpointing(True)
    step(model, x, y)
    times: dict[bool, list[float]] = {False: [], True: []}
    saved: dict[bool, int] = {}
    peaks: dict[bool, int] = {}
    for r in range(args.repeats):
        for flag in (False, True) if r % 2 == 0 else (True, False):
            model.set_activation_checkpointing(flag)
            if x.is_cuda:
                torch.cuda.reset_peak_memory_stats()
            dt, nbytes = step(model, x, y)
            times[flag].append(dt)
            saved[flag] = nbytes
            if x.is_cuda:
                peaks[flag] = torch.cuda.max_memory_allocated()
    ratio = statistics.median(a / b for a, b in zip(times[True], times[False]))
    for flag, label in ((False, "plain"), (True, "checkpointed")):
        peak = f", peak {peaks[flag] / 2**20:,.1f} MiB" if peaks else ""
        med = statistics.median(times[flag]) * 1e3
        print(
            f"{label:>13}: saved for backward {saved[flag] / 2**20:8.2f} MiB{peak}, step {med:.0f} ms"
        )
    print(
        f"activation memory kept: {saved[True] / saved[False]:.3f}x; step time {ratio:.3f}x (median of pairs)"
    )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
