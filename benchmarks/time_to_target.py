"""Time to a useful model: a plain AdamW loop against cadence's default recipe, one invocation.

The plain loop is what a newcomer writes: the default GPT (the same model, built by
``build_workload``), the same prepared training windows read nanoGPT's way (``np.memmap``),
batch 32 x 128, ``torch.optim.AdamW`` at a constant LR of 1e-3 (torch's other defaults), fp32,
eager, no clipping. It trains for ``--budget`` seconds of training time (120 by default) and is
evaluated every ``--eval-every`` steps on the validation windows cadence itself scores
(``workload.evaluate``); the loss it has at the end of the budget is the target L.

cadence then trains its default recipe as shipped (``cadence.train``, with ``train.target=L`` so
it stops there, and the same evaluation interval so both are timed at the same resolution). For
each, the report gives the training time (evaluation excluded: the trainer's ``train_time_s``,
the plain loop's clock stopped while it evaluates) at the first evaluation with loss <= L.

    python benchmarks/time_to_target.py                 # 120 s budget (about 5 minutes)
    python benchmarks/time_to_target.py --budget 20     # a quick look
    python benchmarks/time_to_target.py --set model.n_layer=2   # the recipe, changed
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import cadence
from cadence.runtime.events import Callback
from cadence.workloads import build_workload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import Windows, hardware, loadavg  # noqa: E402

PLAIN_LR = 1e-3


def plain_curve(
    budget_s: float, eval_every: int, seed: int, sets: list[str] = ()
) -> list[tuple[int, float, float]]:
    """(step, training seconds, val_loss) of the plain loop, evaluated every `eval_every` steps
    until `budget_s` seconds of training have passed (and once more at that point). `sets`
    (--set) shape its model and data as they shape cadence's run, so both stay comparable."""
    cfg = cadence.load_config(None, [*sets, "train.progress=false", f"train.seed={seed}"])
    workload = build_workload(cfg)
    model = workload.model
    data = Windows(workload)
    sampler = workload.sampler(cfg.train.seed)
    batch = cfg.batch.size
    opt = torch.optim.AdamW(model.parameters(), lr=PLAIN_LR)
    curve = [(0, 0.0, workload.evaluate(model)["val_loss"])]
    trained, step = 0.0, 0
    model.train()
    while trained < budget_s:
        t0 = time.perf_counter()
        for _ in range(eval_every):
            blocks = data[sampler.indices(step * batch, batch)]
            logits = model(blocks[:, :-1])
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), blocks[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if trained + time.perf_counter() - t0 >= budget_s:
                break
        trained += time.perf_counter() - t0
        model.eval()
        curve.append((step, trained, workload.evaluate(model)["val_loss"]))
        model.train()
    return curve


class Evals(Callback):
    """(step, training seconds, val_loss) at each of the trainer's evaluations."""

    def __init__(self) -> None:
        self.curve: list[tuple[int, float, float]] = []

    def on_eval(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.curve.append(
            (trainer.state.step, trainer.state.train_time_s, float(metrics["val_loss"]))
        )


def cadence_curve(
    target: float, eval_every: int, seed: int, sets: list[str] = ()
) -> list[tuple[int, float, float]]:
    evals = Evals()
    overrides = [
        *sets,
        f"train.target={target}",
        f"train.eval_every={eval_every}",
        f"train.seed={seed}",
        "train.progress=false",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cadence.train(None, Path(tmp) / "run", [evals], overrides, plots=False)
    return evals.curve


def first_at(curve: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    for step, seconds, loss in curve:
        if loss <= target:
            return step, seconds
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=120.0, help="plain loop's training seconds")
    ap.add_argument("--eval-every", type=int, default=20, help="steps between evaluations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the recipe (repeatable): the model and data of both loops, and cadence's "
        "settings, e.g. train.compile=false",
    )
    args = ap.parse_args(argv)
    hw = hardware(torch.device("cpu"))
    now = datetime.datetime.now(datetime.UTC)
    print(
        f"# time_to_target {now:%Y-%m-%d %H:%M} UTC, {hw['cpu']}, {hw['cores']} cores, "
        f"torch {hw['torch']}, {hw['threads']} threads, load {loadavg()}"
    )
    plain = plain_curve(args.budget, args.eval_every, args.seed, args.set)
    target = plain[-1][2]
    print(
        f"plain AdamW lr {PLAIN_LR:g}: {plain[-1][0]} steps in {plain[-1][1]:.1f} s of training, "
        f"val_loss {target:.4f} = L"
    )
    ours = cadence_curve(target, args.eval_every, args.seed, args.set)
    p, c = first_at(plain, target), first_at(ours, target)
    recipe = cadence.load_config(None, args.set)  # both train its batch of windows
    tokens = recipe.batch.size * recipe.model.seq_len
    print(
        "\n| loop | steps to L | training s to L | best val_loss | tokens/s |\n"
        "|---|---:|---:|---:|---:|"
    )
    speed = {}
    for name, curve, hit in (("plain AdamW, constant LR", plain, p), ("cadence default", ours, c)):
        best = min(v for _, _, v in curve)
        cells = (f"{hit[0]}", f"{hit[1]:.1f}") if hit else ("not reached", "-")
        speed[name] = curve[-1][0] * tokens / curve[-1][1]
        print(f"| {name} | {cells[0]} | {cells[1]} | {best:.4f} | {speed[name]:,.0f} |")
    ratio = speed["cadence default"] / speed["plain AdamW, constant LR"]
    print(f"\ncadence / plain tokens/s: {ratio:.3f}x")
    if p and c:
        print(f"cadence / plain time to L: {c[1] / p[1]:.2f}x (goal <= 0.5x)")
    else:
        print("\ncadence's default recipe did not reach L within its step budget")
    print(f"load {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
