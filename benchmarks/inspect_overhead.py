"""What watching a run costs: ``train.inspect_every``, ``train.on_spike`` and sharpness.

The default recipe's model and data (cadence's GPT on the sympy corpus, Muon) trains the same
steps several ways, interleaved round by round so that a change in the machine's load hits
every variant alike:

- ``off``: nothing watched (the baseline);
- ``inspect 10`` and ``inspect 100``: per-layer health every 10 or 100 steps;
- ``spike warn``: the spike rule on every step;
- ``sharpness 100``: the Hessian's top eigenvalue every 100 steps (counted as evaluation by the
  run, so its cost shows in the wall-time column).

Each figure is training seconds (``train_time_s``: evaluation and checkpoints excluded) and its
ratio to ``off`` in the same round, and the ratio of wall time (the whole loop) beside it;
the median over rounds is printed with the spread.

    python benchmarks/inspect_overhead.py              # 3 rounds of 200 steps
    python benchmarks/inspect_overhead.py --steps 60 --rounds 1   # a quick look
    python benchmarks/inspect_overhead.py --tiny --steps 3 --rounds 1   # does it run
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from machine import header

import cadence

VARIANTS = {
    "off": [],
    "inspect 10": ["train.inspect_every=10"],
    "inspect 100": ["train.inspect_every=100"],
    "spike warn": ["train.on_spike=warn"],
    "sharpness 100": ["train.sharpness_every=100"],
}


TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "train.eval_samples=16"]


def run(name: str, steps: int, root: Path, tag: str, tiny: bool) -> tuple[float, float]:
    """(training seconds, wall seconds: the whole loop, sharpness and the one evaluation
    included) of one run."""
    extra = [
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        "train.progress=false",
        "train.compile=false",  # sharpness needs eager blocks; all variants alike
    ]
    cfg = cadence.load_config("default", [*extra, *(TINY if tiny else []), *VARIANTS[name]])
    summary = cadence.train(cfg, run_dir=root / f"{tag}-{name.replace(' ', '-')}", plots=False)
    return summary["train_time_s"], summary["wall_time_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a one-layer model (a smoke test)")
    args = parser.parse_args()
    print(header())
    ratios: dict[str, list[float]] = {n: [] for n in VARIANTS}
    walls: dict[str, list[float]] = {n: [] for n in VARIANTS}
    times: dict[str, list[float]] = {n: [] for n in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            got = {n: run(n, args.steps, Path(tmp), f"r{r}", args.tiny) for n in order}
            for n in VARIANTS:
                times[n].append(got[n][0])
                ratios[n].append(got[n][0] / got["off"][0])
                walls[n].append(got[n][1] / got["off"][1])
            print(f"round {r + 1}: " + ", ".join(f"{n} {got[n][0]:.1f} s" for n in VARIANTS))
    print("\n| variant | training s (median) | vs off (median [min, max]) | wall vs off |")
    print("|---|---:|---:|---:|")
    for n in VARIANTS:
        lo, hi = min(ratios[n]), max(ratios[n])
        med = statistics.median(ratios[n])
        print(
            f"| {n} | {statistics.median(times[n]):.1f} | {med:.3f} [{lo:.3f}, {hi:.3f}] "
            f"| {statistics.median(walls[n]):.3f} |"
        )
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
