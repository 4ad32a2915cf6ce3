"""The GPU check: correctness on CUDA, bf16, FSDP2, torch.compile, host syncs, tokens/s and MFU.

One script, one table, made to run once on a lent GPU machine (under 8 minutes on one H200) and,
with ``--tiny``, anywhere: the test suite runs it on CPU at tiny sizes so it cannot rot between
the rare sessions that have a GPU.

Checks (each a row with its measured value, its tolerance and ok / FAIL):

* ``bf16``: 50 steps of the default recipe through ``cadence.train`` under bf16 autocast against
  the same 50 steps in fp32: the largest relative difference of the per-step training losses.
  bf16 keeps 8 bits of mantissa, so one step's loss moves by ~0.4 % (2^-8); 50 steps of a run
  whose loss falls from 5.6 to 2.5 stay within 3 % of fp32 when nothing is wrong, and a broken
  cast (fp16 overflow, a bf16 optimizer state) is off by far more.
* ``fsdp2-bf16``: the same batches through FSDP2 on a one-process group (``shard_model``: each
  block, then the root; bf16 parameters for compute, fp32 gradient reduction) with the
  optimizer on the DTensor shards, against the plain fp32 loop: same 3 % tolerance.
* ``compile``: the same run with ``train.compile=true`` against eager fp32 (inductor reorders
  reductions: ~1e-6 per step, compounding; 1 % over 50 steps), and that it did not fall back.
* ``host syncs``: ``torch.cuda.set_sync_debug_mode("warn")`` over 20 steps in the middle of a
  run, counting the warnings; the trainer's design reads each step's loss, gradient norm and
  stop flags in one copy (``training/step.py``), so the expected count is one per step. CPU: n/a.
* ``throughput``: a GPT-2-small-class model (12 layers, d 768, 12 heads, vocab 50304, seq 1024:
  124M parameters) on random tokens, bf16 autocast, eager and compiled, with fused AdamW and
  with Muon: tokens/s between steps 10 and 10 + N from the trainer's own metrics rows, and MFU
  = tokens/s x ``flops_per_token()`` / the bf16 matmul rate measured in the same run.

    python benchmarks/gpu.py            # on a CUDA machine
    python benchmarks/gpu.py --tiny     # anywhere, tiny sizes, throughput in fp32 (what
                                        # tests/integration/test_benchmark_scripts.py runs)
    python benchmarks/gpu.py --out      # also write benchmarks/results/gpu-<date>.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import cadence
from cadence.config.parts import optimizer_from
from cadence.models import GPT, GPTConfig
from cadence.runtime.distributed import shard_model
from cadence.runtime.events import Callback
from cadence.training.step import autocast_context, train_step
from cadence.workloads import build_workload
from cadence.workloads.builtin import gpt_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import hardware, loadavg, matmul_rate  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BF16_RTOL = 0.03
COMPILE_RTOL = 0.01


# ---------------------------------------------------------------- sizes


def sizes(tiny: bool) -> dict[str, Any]:
    if tiny:
        small = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.seq_len=32"]
        recipe = cadence.load_config(None, small)
        return {
            "steps": 8,
            "small": small,
            # The checks' own GPT, batch and precision: on CPU every new compiled graph costs
            # C++ builds (~15 s each on a 2-core runner), so the compiled throughput rows reuse
            # the graphs the compile check built (inductor's cache) instead of adding their own.
            "gpt": gpt_config(recipe, vocab_size=512),
            "batch": recipe.batch.size,
            "precision": "fp32",
            "warm": 2,
            "timed": 4,
            "matmul": 256,
            "sync_window": 4,
        }
    return {
        "steps": 50,
        "small": [],  # the default recipe's GPT (4 x 128, 0.8M parameters)
        "gpt": GPTConfig(vocab_size=50304, seq_len=1024, n_layer=12, n_head=12, d_model=768),
        "batch": 16,
        "precision": "bf16",
        "warm": 10,
        "timed": 30,
        "matmul": 8192,
        "sync_window": 20,
    }


# ---------------------------------------------------------------- correctness through cadence.train


class Rows(Callback):
    """Per-step training losses and timings from the trainer's metrics rows."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_log(self, trainer: Any, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))


class SyncCounter(Callback):
    """Turns CUDA's sync debug mode on for steps (start, start + n] and counts its warnings."""

    def __init__(self, start: int, n: int) -> None:
        self.start, self.end, self.count = start, start + n, 0
        self._caught: list[warnings.WarningMessage] | None = None
        self._ctx: Any = None

    def on_step(self, trainer: Any) -> None:
        step = trainer.state.step
        if step == self.start:
            self._ctx = warnings.catch_warnings(record=True)
            self._caught = self._ctx.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif step == self.end and self._ctx is not None:
            torch.cuda.set_sync_debug_mode("default")
            caught = self._caught or []
            self.count = sum("synchroniz" in str(w.message) for w in caught)
            self._ctx.__exit__(None, None, None)
            self._ctx = None


def train_rows(
    size: dict[str, Any], extra: list[str], callbacks: list[Callback] = ()
) -> tuple[list[dict], list[str]]:
    """(metrics rows, warnings) of one run of the default recipe, logged every step."""
    rows = Rows()
    overrides = [
        *size["small"],
        f"train.max_steps={size['steps']}",
        "train.log_every=1",
        f"train.eval_every={size['steps']}",
        "train.eval_samples=64",
        "train.progress=false",
        "train.checkpoint_every=null",
        *extra,
    ]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cadence.train(None, Path(tmp) / "run", [rows, *callbacks], overrides, plots=False)
    return rows.rows, [str(w.message) for w in caught]


def max_rel(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        return float("inf")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def losses(rows: list[dict]) -> list[float]:
    return [r["train_loss"] for r in rows]


# ---------------------------------------------------------------- FSDP2 on one process


@contextlib.contextmanager
def one_process_group(device: torch.device):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 1, is_master=True)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def fsdp_losses(size: dict[str, Any], device: torch.device) -> tuple[list[float], list[float]]:
    """Per-step losses of FSDP2 + bf16 mixed precision and of the plain fp32 loop, same batches."""
    cfg = cadence.load_config(None, [*size["small"], "train.progress=false"])
    workload = build_workload(cfg)
    init = {k: v.clone() for k, v in workload.model.state_dict().items()}
    sampler = workload.sampler(cfg.train.seed)
    out = []
    for sharded in (True, False):
        model = workload.model
        model.load_state_dict(init)
        if sharded:
            shard_model(model, "bf16")
        optimizer = optimizer_from(cfg, model)
        autocast = autocast_context(device, "bf16" if sharded else "fp32")
        run = []
        for step in range(size["steps"]):
            idx = sampler.indices(step * cfg.batch.size, cfg.batch.size)
            batch = workload.batch(idx)
            loss, _, _ = train_step(
                model,
                optimizer,
                workload.loss_sum,
                [batch],
                workload.units(batch),
                autocast=autocast,
            )
            run.append(float(loss))
        out.append(run)
        if sharded:  # back to plain tensors for the reference run
            workload = build_workload(cfg)
    return out[0], out[1]


# ---------------------------------------------------------------- throughput


def gpt_workload(size: dict[str, Any], device: torch.device) -> cadence.DatasetWorkload:
    c: GPTConfig = size["gpt"]
    n = size["batch"] * (size["warm"] + size["timed"])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, c.vocab_size, (n + size["batch"], c.seq_len + 1), generator=g)
    train = TensorDataset(tokens[:n, :-1], tokens[:n, 1:])
    val = TensorDataset(tokens[n:, :-1], tokens[n:, 1:])

    def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    return cadence.DatasetWorkload(GPT(c), train, val, loss=lm_loss, eval_batch_size=4)


def throughput(size: dict[str, Any], compiled: bool, optimizer: str) -> dict[str, Any]:
    c: GPTConfig = size["gpt"]
    rows = Rows()
    steps = size["warm"] + size["timed"]
    overrides = [
        f"optimizer.name={optimizer}",
        "optimizer.lr=6e-4",
        "optimizer.weight_decay=0.1",
        f"batch.size={size['batch']}",
        f"train.precision={size['precision']}",
        f"train.compile={'true' if compiled else 'false'}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.eval_every=1000000000",
        f"train.eval_samples={size['batch']}",
        "train.progress=false",
        "train.checkpoint_every=null",
    ]
    cfg = cadence.load_config(None, overrides)
    workload = gpt_workload(size, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cadence.train(cfg, Path(tmp) / "run", [rows], workload=workload, plots=False)
    by_step = {r["step"]: r for r in rows.rows}
    a, b = by_step[size["warm"]], by_step[steps]
    seconds = b["train_time_s"] - a["train_time_s"]
    samples = size["batch"] * size["timed"]
    fell_back = any("train.compile" in str(w.message) for w in caught)
    return {
        "params": sum(p.numel() for p in workload.model.parameters()),
        "tokens_per_s": samples * c.seq_len / seconds,
        "flops_per_token": workload.model.flops_per_token(),
        "warmup_s": a["train_time_s"],
        "fell_back": fell_back,
        "final_loss": b["train_loss"],
    }


# ---------------------------------------------------------------- the report


def check(name: str, value: float | None, limit: float | None, detail: str) -> dict[str, Any]:
    ok = value is not None and (limit is None or value <= limit)
    return {"check": name, "value": value, "limit": limit, "ok": ok, "detail": detail}


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: runs on CPU in a minute")
    ap.add_argument("--out", nargs="?", const="", default=None, help="write a JSON result")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = sizes(args.tiny)
    now = datetime.datetime.now(datetime.UTC)
    hw = hardware(device)
    print(
        f"# benchmarks/gpu.py {now:%Y-%m-%d %H:%M} UTC on {hw.get('gpu', hw['cpu'])}, "
        f"torch {hw['torch']}, load {loadavg()}{' (tiny sizes)' if args.tiny else ''}"
    )
    t0 = time.perf_counter()
    checks: list[dict[str, Any]] = []

    fp32, _ = train_rows(size, ["train.compile=false"])
    bf16, _ = train_rows(size, ["train.compile=false", "train.precision=bf16"])
    checks.append(
        check(
            "bf16 autocast vs fp32",
            max_rel(losses(bf16), losses(fp32)),
            BF16_RTOL,
            f"{size['steps']} steps, max rel. diff of step losses",
        )
    )

    with one_process_group(device):
        sharded, plain = fsdp_losses(size, device)
    checks.append(
        check(
            "FSDP2 + bf16 vs fp32",
            max_rel(sharded, plain),
            BF16_RTOL,
            "one-process group, bf16 params, fp32 reduce",
        )
    )

    comp, msgs = train_rows(size, ["train.compile=true"])
    fell_back = any("train.compile" in m for m in msgs)
    checks.append(
        check(
            "torch.compile vs eager",
            None if fell_back else max_rel(losses(comp), losses(fp32)),
            COMPILE_RTOL,
            "fell back to eager" if fell_back else "per block, fp32",
        )
    )

    if device.type == "cuda":
        counter = SyncCounter(size["warm"], size["sync_window"])
        train_rows(size, ["train.compile=false"], [counter])
        per_step = counter.count / size["sync_window"]
        checks.append(
            check(
                "host syncs per step",
                per_step,
                1.0,
                "one fused read of loss/grad-norm/flags per step",
            )
        )
    else:
        checks.append(
            {
                "check": "host syncs per step",
                "value": None,
                "limit": None,
                "ok": True,
                "detail": "n/a on CPU",
            }
        )

    dtype = torch.bfloat16 if size["precision"] == "bf16" else torch.float32
    peak = matmul_rate(size["matmul"], 20, device, dtype)
    runs = []
    for optimizer in ("adamw", "muon"):
        for compiled in (False, True):
            r = throughput(size, compiled, optimizer)
            r.update(
                optimizer=optimizer,
                compiled=compiled,
                mfu=r["tokens_per_s"] * r["flops_per_token"] / peak,
            )
            runs.append(r)
    total = time.perf_counter() - t0

    print("\n| check | value | tolerance | result | how |\n|---|---:|---:|---|---|")
    for c in checks:
        print(
            f"| {c['check']} | {fmt(c['value'])} | {fmt(c['limit'])} | "
            f"{'ok' if c['ok'] else 'FAIL'} | {c['detail']} |"
        )
    print(
        f"\n{size['precision']} matmul {size['matmul']}^3: {peak / 1e12:.1f} TFLOP/s; "
        f"model {runs[0]['params'] / 1e6:.1f}M parameters, seq {size['gpt'].seq_len}, "
        f"batch {size['batch']}, steps {size['warm']} + {size['timed']} timed"
    )
    print(
        "\n| optimizer | mode | tokens/s | MFU | warmup s | loss |\n|---|---|---:|---:|---:|---:|"
    )
    for r in runs:
        mode = (
            ("compiled (fell back)" if r["fell_back"] else "compiled") if r["compiled"] else "eager"
        )
        print(
            f"| {r['optimizer']} | {mode} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
            f"{r['warmup_s']:.1f} | {r['final_loss']:.3f} |"
        )
    print(f"\ntotal {total:.0f} s, load {loadavg()}")
    if args.out is not None:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = Path(args.out) if args.out else RESULTS_DIR / f"gpu-{now:%Y-%m-%d}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "hardware": hw,
                    "checks": checks,
                    "throughput": runs,
                    "peak_bf16": peak,
                    "total_s": total,
                },
                indent=2,
            )
        )
        os.replace(tmp, path)
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
