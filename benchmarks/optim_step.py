"""One optimizer step, cadence's vs torch's implementations, on the default GPT's parameters.

    python benchmarks/optim_step.py              # 200 steps per variant, 3 interleaved rounds
    python benchmarks/optim_step.py --all        # every registered optimizer vs torch's fused AdamW

The parameters and gradients are the default recipe's GPT (820k parameters in 4 + 2 groups,
weight decay on matrices only); every variant steps the same tensors from the same state.
Variants: ``cadence`` (what ``optimizer.name: adamw`` builds, through the registry and its
parameter groups) and torch's AdamW with ``foreach=False`` (a loop over tensors), ``foreach=True``
(one kernel per op over all tensors) and ``fused=True``, on the same groups. Reported: the
median step time of each round, the median over rounds and the ratio to cadence's. With
``--all``, the variants are every optimizer in the registry (as ``optimizer.name`` builds it)
next to torch's fused AdamW, which is what the ratios are then taken against.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from overhead import loadavg

import cadence
from cadence.config.parts import optimizer_from
from cadence.optim import OPTIMIZERS, build_optimizer
from cadence.optim.groups import param_groups
from cadence.workloads import build_workload


def step_time(opt: torch.optim.Optimizer, steps: int) -> float:
    # The gradient flips sign every step (outside the timed region): a fixed gradient makes the
    # learning-rate-free estimators (Prodigy, D-Adaptation) grow their step without bound until
    # it overflows, while a flipping one keeps them bounded; no optimizer's cost depends on it.
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    times = []
    for _ in range(steps):
        torch._foreach_neg_(grads)
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--all", action="store_true", help="every registered optimizer")
    args = p.parse_args()
    print(
        f"optimizer step benchmark {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load {loadavg()}"
    )
    cfg = cadence.load_config(None, [])
    model = build_workload(cfg).model
    for prm in model.parameters():
        prm.grad = torch.randn_like(prm) * 1e-3
    o = cfg.optimizer
    hyper = {"lr": o.lr, "betas": tuple(o.betas), "weight_decay": o.weight_decay}

    def torch_adamw(**kw) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(model, o.weight_decay), **hyper, **kw)

    variants = {
        "cadence": lambda: optimizer_from(cfg, model),
        "torch loop": lambda: torch_adamw(foreach=False),
        "torch foreach": lambda: torch_adamw(foreach=True),
        "torch fused": lambda: torch_adamw(fused=True),
    }
    if args.all:
        variants = {"torch fused adamw": variants["torch fused"]}
        for name in OPTIMIZERS:
            lr = 1.0 if OPTIMIZERS[name].lr_free else o.lr
            variants[name] = lambda name=name, lr=lr: build_optimizer(
                name, model, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay
            )
    results: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        names = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in names:
            try:
                opt = variants[name]()
            except (RuntimeError, TypeError, ValueError) as exc:
                print(f"  {name}: not available ({exc})")
                continue
            results[name].append(step_time(opt, args.steps))
    ref = "torch fused adamw" if args.all else "cadence"
    base = statistics.median(results[ref])
    print(f"\n{'variant':18s} {'ms/step':>8s} {'rounds':>26s} {'speed vs ' + ref:>20s}")
    for name, ts in results.items():
        if ts:
            med = statistics.median(ts)
            rounds = ", ".join(f"{t * 1e3:.2f}" for t in ts)
            print(f"{name:18s} {med * 1e3:8.3f} {rounds:>26s} {base / med:19.2f}x")
    print(f"load after: {loadavg()}")


if __name__ == "__main__":
    main()
