"""Trainer overhead, model FLOP utilisation, and what bf16 autocast / torch.compile add.

Everything is measured side by side in one run, because the machines this runs on are shared
and noisy: the variants are interleaved (the order flips every repeat, A B C D / D C B A, which
cancels a linear drift), and the report gives medians and ratios of neighbouring runs, never a
single absolute number on its own.

Variants, all over the same model (the default recipe's GPT, built by
``cadence.workloads.build_workload`` and reset to the same initial weights before every run),
the same batches in the same order, the same AdamW parameter groups and the same LR schedule:

* ``plain``    - a nanoGPT-style loop written out here: sample batch, forward, cross_entropy,
                 backward, clip, step, zero_grad; ``loss.item()`` every 10 steps only.
* ``trainer``  - ``cadence.training.fit(Trainer(cfg, workload))``, the library's own loop.
* ``bf16``     - the trainer with ``train.precision=bf16``.
* ``plain-compile`` - the plain loop with each Transformer block compiled (``block.compile()``,
                 what ``train.compile`` does), so compiled overhead compares like with like.
* ``compile``  - the trainer with ``train.compile=true`` (compile time reported separately),
                 against ``plain-compile`` when that runs too, else against ``trainer``.

Throughput excludes warmup: it is measured between the metrics row logged at step ``warmup``
and the one at ``warmup + steps`` (the rows' ``time_s`` and ``tokens`` for the trainer; the same
step boundaries, right after the ``loss.item()`` sync, for the plain loop). MFU is achieved
FLOP/s (tokens/s x ``model.flops_per_token()``) over the float32 square-matmul rate measured in
the same run.

    python benchmarks/overhead.py                 # full run (several minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick         # smoke run, one repeat, under a minute
    python benchmarks/overhead.py --out           # also write benchmarks/results/overhead-<date>.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cadence import load_config
from cadence.config.parts import lr_schedule_from, optimizer_from
from cadence.data import EpochSampler
from cadence.training import Callback, Trainer, fit
from cadence.training.compiling import compile_model, uncompile
from cadence.workloads import Workload, build_workload

LOG_EVERY = 10  # the trainer's default log interval; the plain loop reads the loss as often
VARIANTS = ("plain", "trainer", "bf16", "plain-compile", "compile")
TRAINER_OVERRIDES = {
    "trainer": [],
    "bf16": ["train.precision=bf16"],
    "compile": ["train.compile=true"],
}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- environment


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def loadavg() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(
    n: int, iters: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> float:
    """FLOP/s of an n x n matmul in `dtype`: 2 n^3 per product, timed over `iters` products."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2.0 * n**3 * iters / (time.perf_counter() - t0)


# ---------------------------------------------------------------- the two loops


def reset(model: torch.nn.Module, init: dict) -> None:
    """The same starting point for every run: initial weights, and no gradients left over
    (fit() leaves the last step's .grad on the parameters; a loop that zeroes gradients after
    the step would otherwise add them to its first gradient)."""
    uncompile(model)  # a compiled variant before this one leaves nothing compiled behind
    model.load_state_dict(init)
    model.zero_grad(set_to_none=True)


def window(marks: list[tuple[int, float, int]], start: int, end: int) -> dict[str, Any]:
    """Throughput between the marks (step, seconds, tokens) at steps `start` and `end`.

    Also the best 10-step chunk inside the window: noise only ever adds time, so the fastest
    chunk is a second, noise-robust estimate of what the code itself costs.
    """
    by_step = {s: (t, k) for s, t, k in marks}
    (t0, k0), (t1, k1) = by_step[start], by_step[end]
    chunks = []
    for s in range(start, end, LOG_EVERY):
        (ta, ka), (tb, kb) = by_step[s], by_step[s + LOG_EVERY]
        chunks.append((kb - ka) / (tb - ta))
    return {
        "tokens_per_s": (k1 - k0) / (t1 - t0),
        "best_chunk_tokens_per_s": max(chunks),
        "warmup_s": t0,  # time to reach the first measured step (includes compilation)
        "window_s": t1 - t0,
    }


class Windows:
    """nanoGPT's reader, written out: packed windows of the prepared training shard (the corpus
    the workload trains from) through ``np.memmap``; ``windows[idx]`` are int64 rows of
    seq_len + 1 tokens, window ``i`` being tokens ``[i * (seq_len + 1), (i + 1) * (seq_len + 1))``
    -- the trainer's packed windows, so both loops see the same batches."""

    def __init__(self, workload: Any) -> None:
        corpus = workload.corpus
        shards = corpus.index["splits"]["train"]["shards"]
        if len(shards) != 1:
            raise SystemExit("benchmark: expects a one-shard corpus (the default recipe's)")
        path = corpus.path / shards[0]["file"]
        self.data = np.memmap(path, dtype=np.dtype(corpus.index["dtype"]), mode="r")
        self.width = workload.window
        self.device = next(workload.model.parameters()).device

    def __getitem__(self, idx: torch.Tensor | int) -> torch.Tensor:
        if isinstance(idx, int) or idx.ndim == 0:
            i = int(idx) * self.width
            return torch.from_numpy(self.data[i : i + self.width].astype(np.int64))
        w = self.width
        rows = np.stack([self.data[i * w : (i + 1) * w] for i in idx.tolist()])
        out = torch.from_numpy(rows.astype(np.int64))
        if self.device.type == "cuda":
            return out.pin_memory().to(self.device, non_blocking=True)
        return out


def run_plain(
    workload: Workload,
    cfg: Any,
    init: dict,
    indices: torch.Tensor,
    warmup: int,
    steps: int,
    compiled: bool = False,
) -> dict[str, Any]:
    """The obvious nanoGPT-style loop over the same model, batches, optimizer and LR."""
    model = workload.model
    reset(model, init)
    if compiled:
        compile_model(model, model)  # per block, in place
    model.train()
    t = cfg.train
    opt = optimizer_from(cfg, model)  # the same optimizer and parameter groups as the trainer
    lr_mult = lr_schedule_from(cfg)
    data = Windows(workload)
    batch, seq = indices.shape[1], workload.tokens_per_sample
    total = warmup + steps
    marks = [(0, 0.0, 0)]
    loss_value = float("nan")
    t_start = time.perf_counter()
    for step in range(total):
        mult = lr_mult(step)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * mult
        blocks = data[indices[step]]
        x, y = blocks[:, :-1], blocks[:, 1:]
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        if t.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % LOG_EVERY == 0:
            loss_value = loss.item()  # the only host sync, as often as the trainer logs
            done = step + 1
            marks.append((done, time.perf_counter() - t_start, done * batch * seq))
    result = window(marks, warmup, total)
    result["final_loss"] = loss_value
    uncompile(model)
    return result


class Marks(Callback):
    """Records (step, train_time_s, tokens, train_loss) from the trainer's own metrics rows.

    ``train_time_s``, not ``time_s``: the last row is logged after the final evaluation, whose
    time ``time_s`` includes (0.6 s at 256 samples, ~10 % of a 30-step window); the plain loop
    evaluates nothing, so the trainer is timed on its training alone too.
    """

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, int, float]] = []

    def on_log(self, trainer: Any, row: dict[str, Any]) -> None:
        self.rows.append((row["step"], row["train_time_s"], row["tokens"], row["train_loss"]))


def run_trainer(
    workload: Workload, cfg: Any, init: dict, warmup: int, steps: int
) -> dict[str, Any]:
    """cadence's own loop: fit(Trainer(cfg, workload)); timings from its metrics rows."""
    reset(workload.model, init)
    marks = Marks()
    fit(Trainer(cfg, workload, [marks]))
    result = window([(0, 0.0, 0), *[r[:3] for r in marks.rows]], warmup, warmup + steps)
    result["final_loss"] = next(v for s, _, _, v in marks.rows if s == warmup + steps)
    return result


# ---------------------------------------------------------------- the benchmark


def steps_of(args: argparse.Namespace, name: str) -> int:
    return args.steps if name in ("plain", "trainer") else args.slow_steps


def repeats_of(args: argparse.Namespace, name: str) -> int:
    return args.repeats if name in ("plain", "trainer") else min(args.repeats, args.slow_repeats)


def make_config(args: argparse.Namespace, name: str) -> Any:
    """The recipe, no progress bar, no eval in the timed window, this variant's precision."""
    total = args.warmup + steps_of(args, name)
    base = load_config(args.recipe)
    common = [
        "train.progress=false",
        f"train.max_steps={total}",
        "train.eval_every=1000000000",  # evaluates once, at the end, after the timed window
        f"train.log_every={LOG_EVERY}",
        "train.checkpoint_every=null",
    ]
    if base.schedule.warmup >= total:  # a short run keeps a valid schedule; speed is unchanged
        common.append(f"schedule.warmup={total // 2}")
    return load_config(args.recipe, common + TRAINER_OVERRIDES.get(name, []))


def print_header(name: str, now: datetime.datetime, hw: dict[str, Any]) -> None:
    """The first two lines of a report: which benchmark, when, on what."""
    print(f"cadence {name} benchmark  {now:%Y-%m-%d %H:%M}")
    print(
        f"{hw['cpu']}, {hw['cores']} cores ({hw['cores_usable']} usable), torch {hw['torch']}, "
        f"{hw['threads']} threads, device {hw['device']}, python {hw['python']}"
    )


def write_result(result: dict[str, Any], out_arg: str, name: str, now: datetime.datetime) -> None:
    """``--out``: a .json path, or a folder that gets ``NAME-<date>.json``."""
    out = Path(out_arg)
    if out.suffix != ".json":
        out = out / f"{name}-{now:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarise(raw: dict[str, list[dict]], flops_per_token: float, peak: float) -> dict[str, Any]:
    """Medians per variant and medians of per-repeat ratios against the reference variant."""
    refs = {"trainer": "plain", "bf16": "trainer", "plain-compile": "plain", "compile": "trainer"}
    if "plain-compile" in raw:
        refs["compile"] = "plain-compile"  # the trainer's overhead when both compile
    out: dict[str, Any] = {}
    for name, runs in raw.items():
        ok = [r for r in runs if "error" not in r]
        tps = median([r["tokens_per_s"] for r in ok])
        entry: dict[str, Any] = {
            "runs": len(ok),
            "tokens_per_s": tps,
            "best_chunk_tokens_per_s": max(
                (r["best_chunk_tokens_per_s"] for r in ok), default=None
            ),
            "mfu": tps * flops_per_token / peak if tps else None,
        }
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            entry["error"] = errors[0]
        ref = refs.get(name)
        if ref is not None and ok:
            pairs = [  # runs of the same repeat, next to each other in time
                (r["tokens_per_s"] / q["tokens_per_s"])
                for r, q in zip(runs, raw[ref])
                if "error" not in r and "error" not in q
            ]
            entry["vs"] = ref
            entry["ratio_median"] = median(pairs)
            entry["ratio_min"] = min(pairs, default=None)
            entry["ratio_max"] = max(pairs, default=None)
            best_ref = out[ref]["best_chunk_tokens_per_s"]
            if best_ref:
                entry["ratio_best_chunk"] = entry["best_chunk_tokens_per_s"] / best_ref
        if name in ("compile", "plain-compile") and ok:
            # The first compiled run pays for compilation inside its warmup steps; later runs
            # reuse dynamo's cache. Excess over the warmup steps at the steady-state rate:
            first = ok[0]
            steady = first["warmup_tokens"] / first["tokens_per_s"]
            entry["compile_s"] = max(0.0, first["warmup_s"] - steady)
        out[name] = entry
    return out


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(result: dict[str, Any]) -> None:
    s, peak = result["summary"], result["matmul"]["peak_flops"]
    labels = {
        "plain": "plain PyTorch loop",
        "trainer": "cadence trainer fp32",
        "bf16": "trainer bf16 autocast",
        "plain-compile": "plain loop, compiled",
        "compile": "trainer torch.compile",
    }
    print()
    head = (
        f"{'variant':<24}{'tokens/s':>10}{'best 10-step':>14}{'MFU':>8}   ratio (median [min..max])"
    )
    print(head)
    print("-" * len(head))
    for name, e in s.items():
        if e["runs"] == 0:
            print(f"{labels[name]:<24}{'failed':>10}   {e.get('error', '')}")
            continue
        ratio = ""
        if "ratio_median" in e:
            ratio = (
                f"{e['ratio_median']:.3f} [{e['ratio_min']:.3f}..{e['ratio_max']:.3f}]"
                f" vs {e['vs']}; best-chunk {fmt(e.get('ratio_best_chunk'), '.3f')}"
            )
        print(
            f"{labels[name]:<24}{e['tokens_per_s']:>10.0f}{e['best_chunk_tokens_per_s']:>14.0f}"
            f"{e['mfu']:>8.1%}   {ratio}"
        )
        if name in ("compile", "plain-compile"):
            print(f"{'':<24}compile time ~{e['compile_s']:.1f} s (excluded from tokens/s)")
    m = result["matmul"]
    print(
        f"\nfp32 matmul {m['n']}x{m['n']}: median {peak / 1e9:.1f} GFLOP/s "
        f"(runs: {', '.join(f'{r / 1e9:.0f}' for r in m['rates'])}); "
        f"model {result['flops_per_token'] / 1e6:.2f} MFLOP/token (6N + 12LdT)"
    )
    if "loss_check" in result:
        lc = result["loss_check"]
        print(
            f"same work: train loss at step {lc['step']}: plain {lc['plain']:.4f}, "
            f"trainer {lc['trainer']:.4f}"
        )
    print(f"load average before/after: {result['loadavg_start']} / {result['loadavg_end']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="measured steps per run (x10)")
    p.add_argument("--warmup", type=int, default=10, help="steps before the window (x10)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every variant")
    p.add_argument(
        "--slow-steps", type=int, default=10, help="measured steps for bf16 and compile (x10)"
    )
    p.add_argument(
        "--slow-repeats", type=int, default=2, help="repeats (the first ones) for bf16 and compile"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 10+10 steps, one repeat")
    p.add_argument("--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS))
    p.add_argument("--recipe", default="default", help="recipe name or YAML path")
    p.add_argument("--matmul-n", type=int, default=1024, help="size of the square matmul")
    p.add_argument(
        "--out",
        nargs="?",
        const=str(RESULTS_DIR),
        help="write JSON: a .json path, or a folder for overhead-<date>.json (default folder: "
        "benchmarks/results)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats, args.slow_steps = 10, 10, 1, 10
    for n in (args.steps, args.warmup, args.slow_steps):
        if n % LOG_EVERY or n < LOG_EVERY:
            p.error(f"--steps, --slow-steps and --warmup must be positive multiples of {LOG_EVERY}")
    asked = {v.strip() for v in args.variants.split(",") if v.strip()}
    unknown = asked - set(VARIANTS)
    variants = [v for v in VARIANTS if v in asked]  # references first, for the ratios
    if unknown or "plain" not in variants or "trainer" not in variants:
        p.error(f"--variants: choose from {', '.join(VARIANTS)}; plain and trainer are required")

    now = datetime.datetime.now()
    cfgs = {name: make_config(args, name) for name in variants}
    workload = build_workload(cfgs["plain"])
    device = next(workload.model.parameters()).device
    init = {k: v.detach().clone() for k, v in workload.model.state_dict().items()}
    batch = int(cfgs["plain"].batch.size)
    total = args.warmup + max(args.steps, args.slow_steps)
    sampler = EpochSampler(workload.n_train, cfgs["plain"].train.seed)
    indices = sampler.indices(0, total * batch).view(total, batch)  # the trainer's own order
    fpt = workload.model.flops_per_token()
    hw = hardware(device)

    print_header("overhead", now, hw)
    print(
        f"model: GPT {cfgs['plain'].model.n_layer}x{cfgs['plain'].model.d_model}, "
        f"{workload.model.num_params():,} params; batch {batch} x {workload.tokens_per_sample} "
        f"tokens; {args.warmup} warmup + {args.steps} measured steps x {args.repeats} repeats "
        f"(bf16/compile: {args.slow_steps} x {min(args.repeats, args.slow_repeats)}), "
        f"interleaved; variants {', '.join(variants)}"
    )
    start_load = loadavg()
    raw: dict[str, list[dict]] = {v: [] for v in variants}
    rates: list[float] = []
    failed: dict[str, str] = {}
    for rep in range(args.repeats):
        rates.append(matmul_rate(args.matmul_n, 10, device))
        order = variants if rep % 2 == 0 else variants[::-1]
        for name in order:
            if rep >= repeats_of(args, name):
                continue
            if name in failed:
                raw[name].append({"error": failed[name]})
                continue
            t0 = time.perf_counter()
            try:
                if name == "plain":
                    r = run_plain(workload, cfgs[name], init, indices, args.warmup, args.steps)
                elif name == "plain-compile":
                    r = run_plain(
                        workload, cfgs[name], init, indices, args.warmup, args.slow_steps, True
                    )
                else:
                    r = run_trainer(workload, cfgs[name], init, args.warmup, steps_of(args, name))
            except Exception as exc:  # e.g. inductor without a working C compiler
                failed[name] = one_line(exc)
                raw[name].append({"error": failed[name]})
                print(f"  repeat {rep + 1}: {name:<8} FAILED {failed[name]}", flush=True)
                continue
            r["warmup_tokens"] = args.warmup * batch * workload.tokens_per_sample
            r["wall_s"] = time.perf_counter() - t0
            raw[name].append(r)
            print(
                f"  repeat {rep + 1}: {name:<8} {r['tokens_per_s']:>8.0f} tokens/s "
                f"(best chunk {r['best_chunk_tokens_per_s']:.0f}, run {r['wall_s']:.1f} s)",
                flush=True,
            )
    peak = statistics.median(rates)
    result: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "hardware": hw,
        "args": vars(args),
        "batch": batch,
        "seq_len": workload.tokens_per_sample,
        "flops_per_token": fpt,
        "matmul": {"n": args.matmul_n, "rates": rates, "peak_flops": peak},
        "summary": summarise(raw, fpt, peak),
        "raw": raw,
        "loadavg_start": start_load,
        "loadavg_end": loadavg(),
    }
    plain_ok = [r for r in raw["plain"] if "error" not in r]
    trainer_ok = [r for r in raw["trainer"] if "error" not in r]
    if plain_ok and trainer_ok:
        result["loss_check"] = {
            "step": args.warmup + args.steps,
            "plain": plain_ok[0]["final_loss"],
            "trainer": trainer_ok[0]["final_loss"],
        }
    print_table(result)
    if args.out:
        write_result(result, args.out, "overhead", now)
    return 0


if __name__ == "__main__":
    sys.exit(main())
