"""Training tokens/s of a tiny Hugging Face Llama and cadence's GPT, under three loops.

Two models of the same size, on the ``lm`` workload's byte-level text (vocabulary 256, 128
tokens per sample, batch 32, fp32, eager):

* ``llama`` - ``model.hf_config: {model_type: llama, hidden_size: 128, 4 layers, 4 heads,
              intermediate_size: 341, tied embeddings}``, built by cadence as an ``HFCausalLM``.
              Its gated MLP has 3 matrices of 128 x 341, against the GPT's 2 of 128 x 512, so the
              non-embedding parameter counts differ by 512 (0.07 %).
* ``gpt``   - the default recipe's GPT (d_model 128, 4 layers, 4 heads, 4x GELU MLP, RoPE).

Each model is trained three ways, over the same initial weights (reset before every run), the
same batches in the same order (the trainer's own ``EpochSampler`` order), the same AdamW
(cadence's parameter groups: no decay on norms, biases, embeddings; the recipe's lr, betas,
eps, weight decay), a constant LR (``schedule.name=constant``, no warmup) and the recipe's
gradient clipping (norm 1.0; HF's ``max_grad_norm``):

* ``plain``      - ``overhead.run_plain``: forward, cross_entropy, backward, clip, step,
                   zero_grad; ``loss.item()`` every 10 steps.
* ``cadence``    - ``cadence.training.fit(Trainer(cfg, workload))`` (``overhead.run_trainer``).
* ``hf-trainer`` - ``transformers.Trainer`` over the same model in a thin adapter whose
                   ``forward(input_ids, labels)`` returns ``{"loss", "logits"}`` with the same
                   ``cross_entropy`` over the same 128 predictions per sample (inputs and labels
                   are the block shifted by one, so HF's own label shifting is never used), our
                   optimizer passed in, a sequential sampler over the blocks in the same order.

Throughput excludes warmup: it is taken between step ``warmup`` and step ``warmup + steps``
(the trainer's metrics rows, with its one final evaluation cut to 1 sample because the last row
is written after it; the plain loop's marks after its ``loss.item()``; for the HF Trainer
``time.perf_counter()`` in a ``TrainerCallback.on_step_end``) and counts 32 x 128 tokens per
step in every variant. ``--steps`` and ``--warmup`` are multiples of 10 (default 30 and 10):
the plain loop reads the loss and the trainer logs every 10 steps, as in overhead.py, and those
are the step boundaries both can be timed at. All six runs (model x variant) go interleaved,
the order flipping every repeat; the report gives medians and medians of per-repeat ratios to
``plain``. MFU is tokens/s x ``flops_per_token()`` over the median fp32 matmul rate, measured
before and after every repeat (overhead.py's ``matmul_rate``).

    python benchmarks/hf_throughput.py            # full run (several minutes on 2 CPU cores)
    python benchmarks/hf_throughput.py --quick    # smoke run: 10 + 10 steps, one repeat, ~1 min
    python benchmarks/hf_throughput.py --out      # also write benchmarks/results/hf_throughput-<date>.json

HF's Trainer needs accelerate (``pip install -e '.[bench]'``); transformers is a dependency.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from overhead import (
    LOG_EVERY,
    RESULTS_DIR,
    Windows,
    fmt,
    hardware,
    loadavg,
    matmul_rate,
    one_line,
    print_header,
    reset,
    run_plain,
    run_trainer,
    summarise,
    window,
    write_result,
)
from torch import nn

from cadence import load_config
from cadence.data import EpochSampler
from cadence.optim.groups import param_groups
from cadence.workloads import Workload, build_workload

VARIANTS = ("plain", "cadence", "hf-trainer")
LLAMA = (
    "{model_type: llama, hidden_size: 128, num_hidden_layers: 4, num_attention_heads: 4, "
    "num_key_value_heads: 4, intermediate_size: 341, max_position_embeddings: 128, "
    "tie_word_embeddings: true}"
)
MODELS = {  # name -> overrides on the default recipe (whose model is the GPT)
    "llama": [f"model.hf_config={LLAMA}"],
    "gpt": [],
}


# ---------------------------------------------------------------- the HF Trainer variant


class LossAdapter(nn.Module):
    """``forward(input_ids, labels) -> {"loss", "logits"}``, the interface HF's Trainer calls.

    The same loss as the other two loops: the model's float logits for the block's first
    ``seq_len`` tokens, cross-entropy against its last ``seq_len`` (labels come pre-shifted).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.last_loss: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(input_ids)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1))
        self.last_loss = loss.detach()
        return {"loss": loss, "logits": logits}


class Blocks(torch.utils.data.Dataset):
    """The token blocks in the order the other loops draw them: item i is sample i of the run."""

    def __init__(self, data: Windows, order: torch.Tensor) -> None:
        self.data, self.order = data, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = self.data[int(self.order[i])]
        return {"input_ids": block[:-1], "labels": block[1:]}


def step_marks(tokens_per_step: int, total: int, adapter: LossAdapter) -> Any:
    """A TrainerCallback recording (step, seconds, tokens) at the end of every optimizer step,
    and the loss of the last step (read after its mark, outside the timed window)."""
    from transformers import TrainerCallback

    class StepMarks(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[int, float, int]] = []
            self.final_loss = float("nan")

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()
            self.marks = [(0, 0.0, 0)]

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            s = state.global_step
            self.marks.append((s, time.perf_counter() - self.t0, s * tokens_per_step))
            if s == total and adapter.last_loss is not None:
                self.final_loss = adapter.last_loss.item()

    return StepMarks()


def run_hf_trainer(
    workload: Workload, cfg: Any, init: dict, indices: torch.Tensor, warmup: int, steps: int
) -> dict[str, Any]:
    """transformers.Trainer over the same model, batches, optimizer groups, LR and clipping."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    model = workload.model
    reset(model, init)
    adapter = LossAdapter(model)
    o, total = cfg.optimizer, warmup + steps
    batch, seq = indices.shape[1], workload.tokens_per_sample
    optimizer = torch.optim.AdamW(  # HF's default groups would decay embeddings; use cadence's
        param_groups(adapter, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps
    )
    marks = step_marks(batch * seq, total, adapter)
    with tempfile.TemporaryDirectory(prefix="hf_throughput-") as out_dir:
        args = TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=batch,
            max_steps=total,
            learning_rate=o.lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.betas[0],
            adam_beta2=o.betas[1],
            adam_epsilon=o.eps,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=cfg.train.clip_grad_norm or 0.0,
            logging_steps=10**9,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            train_sampling_strategy="sequential",  # the order is the dataset's, set above
            disable_tqdm=True,
            seed=cfg.train.seed,
        )
        dataset = Blocks(Windows(workload), indices[:total].reshape(-1))
        trainer = Trainer(
            model=adapter,
            args=args,
            train_dataset=dataset,
            callbacks=[marks],
            optimizers=(optimizer, None),  # HF builds the constant schedule around it
        )
        trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line
        trainer.train()
    result = window(marks.marks, warmup, total)
    result["final_loss"] = marks.final_loss
    return result


# ---------------------------------------------------------------- the benchmark


def make_config(args: argparse.Namespace, model: str) -> Any:
    """The default recipe with this model, a constant LR, no eval or checkpoints in the run."""
    total = args.warmup + args.steps
    common = [
        "train.progress=false",
        f"train.max_steps={total}",
        "train.eval_every=1000000000",
        # fit() still evaluates once after the last step; overhead.Marks times the trainer by
        # train_time_s, which leaves it out, and one sample keeps it short anyway.
        "train.eval_samples=1",
        f"train.log_every={LOG_EVERY}",
        "train.checkpoint_every=null",
        "train.precision=fp32",
        "train.compile=false",
        "batch.size=32",
        "schedule.name=constant",
        "schedule.warmup=0",
    ]
    return load_config(None, common + MODELS[model])


def run_one(
    name: str, workload: Workload, cfg: Any, init: dict, indices: Any, args: argparse.Namespace
) -> dict[str, Any]:
    if name == "plain":
        return run_plain(workload, cfg, init, indices, args.warmup, args.steps)
    if name == "cadence":
        return run_trainer(workload, cfg, init, args.warmup, args.steps)
    return run_hf_trainer(workload, cfg, init, indices, args.warmup, args.steps)


def summarise_model(runs: dict[str, list[dict]], fpt: float, peak: float) -> dict[str, Any]:
    """overhead.summarise per variant against ``plain`` (it names the compared one "trainer")."""
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        pair = {"plain": runs["plain"], "trainer": rs} if name != "plain" else {"plain": rs}
        out[name] = summarise(pair, fpt, peak)["trainer" if name != "plain" else "plain"]
    return out


def print_table(result: dict[str, Any]) -> None:
    peak = result["matmul"]["peak_flops"]
    head = (
        f"{'model':<8}{'variant':<12}{'tokens/s':>10}{'best 10-step':>14}{'MFU':>8}"
        f"{'loss':>9}   ratio to plain (median [min..max]; best-chunk)"
    )
    print()
    print(head)
    print("-" * len(head))
    for model, m in result["models"].items():
        for name, e in m["summary"].items():
            label = f"{model if name == VARIANTS[0] else '':<8}{name:<12}"
            if e["runs"] == 0:
                print(f"{label}{'failed':>10}   {e.get('error', '')}")
                continue
            ratio = "reference"
            if "ratio_median" in e:
                ratio = (
                    f"{e['ratio_median']:.3f} [{e['ratio_min']:.3f}..{e['ratio_max']:.3f}]; "
                    f"{fmt(e.get('ratio_best_chunk'), '.3f')}"
                )
            print(
                f"{label}{e['tokens_per_s']:>10.0f}{e['best_chunk_tokens_per_s']:>14.0f}"
                f"{e['mfu']:>8.1%}{fmt(m['final_loss'].get(name), '>9.4f')}   {ratio}"
            )
    print()
    for model, m in result["models"].items():
        print(
            f"{model}: {m['params']:,} params ({m['params_non_embedding']:,} non-embedding), "
            f"{m['flops_per_token'] / 1e6:.3f} MFLOP/token (6N + 12LdT)"
        )
    mm = result["matmul"]
    print(
        f"fp32 matmul {mm['n']}x{mm['n']}: median {peak / 1e9:.1f} GFLOP/s "
        f"(runs: {', '.join(f'{r / 1e9:.0f}' for r in mm['rates'])})"
    )
    print(
        f"loss = train loss at step {result['args']['warmup'] + result['args']['steps']} "
        "(first repeat); the same work gives the same loss in all three loops"
    )
    print(f"load average before/after: {result['loadavg_start']} / {result['loadavg_end']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="measured steps per run (x10)")
    p.add_argument("--warmup", type=int, default=10, help="steps before the window (x10)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every run")
    p.add_argument("--quick", action="store_true", help="smoke run: 10+10 steps, one repeat")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--matmul-n", type=int, default=1024, help="size of the square matmul")
    p.add_argument(
        "--out",
        nargs="?",
        const=str(RESULTS_DIR),
        help="write JSON: a .json path, or a folder for hf_throughput-<date>.json (default "
        "folder: benchmarks/results)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 10, 10, 1
    for n in (args.steps, args.warmup):
        # the marks (plain loop's loss reads, trainer's metrics rows) come every LOG_EVERY steps
        if n % LOG_EVERY or n < LOG_EVERY:
            p.error(f"--steps and --warmup must be positive multiples of {LOG_EVERY}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    now = datetime.datetime.now()
    total = args.warmup + args.steps
    setups: dict[str, dict[str, Any]] = {}
    for model in MODELS:
        cfg = make_config(args, model)
        workload = build_workload(cfg)
        batch = int(cfg.batch.size)
        sampler = EpochSampler(workload.n_train, cfg.train.seed)
        setups[model] = {
            "cfg": cfg,
            "workload": workload,
            "init": {k: v.detach().clone() for k, v in workload.model.state_dict().items()},
            "indices": sampler.indices(0, total * batch).view(total, batch),  # trainer's order
        }
    device = next(setups["gpt"]["workload"].model.parameters()).device
    hw = hardware(device)
    seq = setups["gpt"]["workload"].tokens_per_sample
    batch = int(setups["gpt"]["cfg"].batch.size)

    print_header("HF throughput", now, hw)
    for model, s in setups.items():
        m = s["workload"].model
        print(
            f"{model}: {type(m).__name__}, {m.num_params():,} params, "
            f"{m.num_params(exclude_embeddings=True):,} non-embedding"
        )
    print(
        f"batch {batch} x {seq} tokens, fp32 eager; {args.warmup} warmup + {args.steps} measured "
        f"steps x {args.repeats} repeats, interleaved; variants {', '.join(VARIANTS)}"
    )
    runs = [(model, name) for model in MODELS for name in VARIANTS]
    start_load = loadavg()
    raw: dict[str, dict[str, list[dict]]] = {m: {v: [] for v in VARIANTS} for m in MODELS}
    rates: list[float] = []
    for rep in range(args.repeats):
        rates.append(matmul_rate(args.matmul_n, 10, device))
        for model, name in runs if rep % 2 == 0 else runs[::-1]:
            s = setups[model]
            t0 = time.perf_counter()
            try:
                r = run_one(name, s["workload"], s["cfg"], s["init"], s["indices"], args)
            except Exception as exc:  # e.g. a transformers version whose Trainer refuses a kwarg
                raw[model][name].append({"error": one_line(exc)})
                print(f"  repeat {rep + 1}: {model:<6}{name:<11} FAILED {one_line(exc)}")
                continue
            r["wall_s"] = time.perf_counter() - t0
            raw[model][name].append(r)
            print(
                f"  repeat {rep + 1}: {model:<6}{name:<11}{r['tokens_per_s']:>8.0f} tokens/s "
                f"(best chunk {r['best_chunk_tokens_per_s']:.0f}, run {r['wall_s']:.1f} s)",
                flush=True,
            )
        rates.append(matmul_rate(args.matmul_n, 10, device))  # before and after every repeat
    peak = statistics.median(rates)
    models: dict[str, Any] = {}
    for model, s in setups.items():
        m = s["workload"].model
        fpt = m.flops_per_token()
        models[model] = {
            "class": type(m).__name__,
            "params": m.num_params(),
            "params_non_embedding": m.num_params(exclude_embeddings=True),
            "flops_per_token": fpt,
            "summary": summarise_model(raw[model], fpt, peak),
            "final_loss": {
                name: next((r["final_loss"] for r in rs if "error" not in r), None)
                for name, rs in raw[model].items()
            },
            "raw": raw[model],
        }
    result: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "hardware": hw,
        "args": vars(args),
        "batch": batch,
        "seq_len": seq,
        "tokens_per_step": batch * seq,
        "llama_config": LLAMA,
        "matmul": {"n": args.matmul_n, "rates": rates, "peak_flops": peak},
        "models": models,
        "loadavg_start": start_load,
        "loadavg_end": loadavg(),
    }
    print_table(result)
    if args.out:
        write_result(result, args.out, "hf_throughput", now)
    return 0


if __name__ == "__main__":
    sys.exit(main())
