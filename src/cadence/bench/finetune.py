"""The ``finetune`` suite's workload: adapt a GPT that cadence pretrained, on a small instruction
task that cadence writes itself, scored by exact match of greedy answers on held-out questions.

``workload: cadence.bench.finetune:instruction_task``. The base model is cadence's GPT of the
config's shape, pretrained on the default corpus (the installed sympy's source, byte tokens) by
``cadence train`` in a child process, once per shape, into the data cache
(``$CADENCE_CACHE/finetune-base``); every strategy of the suite starts from those weights. The
task is conversations in cadence's default chat template asking to upper-case a random word: not
in the pretraining text as such, exactly checkable, and learnable by a 2-layer byte-level
model in a few hundred steps on a CPU (a tuned full fine-tune answers 93 % of held-out words by
step 200), so methods differ in how fast they get there rather than whether. Reversing words
or doubling their letters were tried too: after 400 steps the same model answered 7 to 16 %. The metric is ``val_exact_match``: the share of held-out
questions whose greedy answer (up to the template's ``<|end|>``) is the expected one.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import nn

from cadence.config import Config, ConfigError
from cadence.data.cache import cache_folder
from cadence.data.chat import DEFAULT_TEMPLATE, Messages, jinja_renderer
from cadence.data.chat_streams import chat_splits_in_memory, split_stream
from cadence.data.tokenizers import ByteTokenizer
from cadence.models import GPT
from cadence.models.generate import SamplingParams, generate_batch
from cadence.runtime.distributed import all_reduce_sums
from cadence.training.checkpoint import tied_names
from cadence.workloads.builtin import gpt_config
from cadence.workloads.chat import ChatWorkload
from cadence.workloads.device import resolve_device
from cadence.workloads.protocol import val_ranges

if TYPE_CHECKING:
    from cadence.runtime.distributed import World

__all__ = ["PRETRAIN", "InstructionTask", "instruction_task", "make_task", "pretrained_base"]

END = "<|end|>"  # what DEFAULT_TEMPLATE closes an answer with

# How the base is pretrained: the `lm` workload's default corpus at the config's model shape,
# AdamW + cosine at the LR the modern suite uses for its 2-layer lm.
PRETRAIN: dict[str, Any] = {
    "max_steps": 300,
    "batch.size": 32,
    "optimizer.name": "adamw",
    "optimizer.lr": 0.006,
    "optimizer.weight_decay": 0.0,
    "schedule.name": "cosine",
    "schedule.warmup": 0.1,
    "schedule.min_lr_ratio": 0.1,
    "data.max_bytes": 1_000_000,
    "train.clip_grad_norm": 1.0,
}
TASK_SIZE = 2000  # conversations; every 10th is held out
TASK_SEED = 1234


def make_task(n: int = TASK_SIZE, seed: int = TASK_SEED) -> list[Messages]:
    """``n`` instruction conversations, a pure function of (n, seed): upper-case a random word
    of 3 to 8 lowercase letters."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        out.append(
            [
                {"role": "user", "content": f"Upper-case: {word}"},
                {"role": "assistant", "content": word.upper()},
            ]
        )
    return out


def _base_settings(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    shape = {
        "model.n_layer": m.n_layer,
        "model.n_head": m.n_head,
        "model.d_model": m.d_model,
        "model.seq_len": m.seq_len,
        "model.norm": m.norm,
        "model.tie_embeddings": m.tie_embeddings,
    }
    steps = PRETRAIN["max_steps"]
    rest = {k: v for k, v in PRETRAIN.items() if k != "max_steps"}
    return {"workload": "lm", **shape, **rest, "train.max_steps": steps, "train.seed": 0}


def pretrained_base(cfg: Config) -> Path:
    """The base run's folder for ``cfg``'s model shape, pretrained on first use (cached)."""
    settings = _base_settings(cfg)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def pretrain(folder: Path) -> None:
        sets = [a for k, v in settings.items() for a in ("--set", f"{k}={_yaml(v)}")]
        sets += ["--set", "train.progress=false", "--set", "train.eval_every=100"]
        res = _cadence(["train", *sets, "--run-dir", str(folder / "run")])
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ConfigError(f"workload: pretraining the finetune base failed: {tail}")

    return cache_folder("finetune-base", key, pretrain, "pretraining the finetune suite's base")


def _cadence(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``cadence ARGS`` in a child process: the pretraining has its own RNG, threads and signal
    handlers, and leaves the calling run's untouched."""
    cmd = [sys.executable, "-m", "cadence", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _yaml(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (bool, list, dict)) else str(value)


class InstructionTask(ChatWorkload):
    """A chat workload that also answers its held-out questions greedily and scores them."""

    metric = "val_exact_match"
    higher_is_better = True

    def __init__(self, *args: Any, questions: list[Messages], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        render = jinja_renderer(DEFAULT_TEMPLATE)
        tok = ByteTokenizer()
        self.prompts = [tok.encode(render(q[:-1], True)).tolist() for q in questions]
        self.answers = [q[-1]["content"] for q in questions]
        longest = max(len(a) for a in self.answers) + len(END)
        self.max_new = longest

    @torch.no_grad()
    def evaluate(self, model: nn.Module, world: World | None = None) -> dict[str, float]:
        metrics = super().evaluate(model, world)
        net = _unwrapped(model)
        tok = ByteTokenizer()
        right, asked = 0, 0
        for a, b in val_ranges(self.n_val, 64, world):
            if a == b:
                continue
            prompts = self.prompts[a:b]
            params = [SamplingParams(max_new_tokens=self.max_new, temperature=0.0)] * (b - a)
            rows: list[list[int]] = [[] for _ in prompts]
            for step in generate_batch(net, prompts, params):
                for i, t in enumerate(step):
                    if t is not None:
                        rows[i].append(t)
            for i, ids in enumerate(rows):
                text = tok.decode(ids)
                right += int(text.split(END)[0] == self.answers[a + i] and END in text)
                asked += 1
        right_sum, asked_sum = all_reduce_sums([right, asked], world)
        metrics["val_exact_match"] = right_sum / max(1, asked_sum)
        return metrics


def _unwrapped(model: nn.Module) -> nn.Module:
    """The GPT under DDP's ``module`` and torch.compile's ``_orig_mod`` (generation needs its
    KV cache)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def instruction_task(cfg: Config) -> InstructionTask:
    """The workload: the pretrained base (its weights loaded into a GPT of the config's shape)
    and the task, split every 10th conversation for validation."""
    if cfg.model.arch not in (None, "gpt"):
        raise ConfigError("model.arch: the finetune task adapts cadence's GPT (arch gpt)")
    base = pretrained_base(cfg)
    torch.manual_seed(cfg.train.seed)  # the base's weights are loaded, not drawn
    model = GPT(gpt_config(cfg, ByteTokenizer.vocab_size))
    weights = load_file(str(base / "run" / "model.safetensors"))
    for names in tied_names(model):  # a tied head is saved once, under one of its names
        value = next((weights[n] for n in names if n in weights), None)
        if value is not None:
            weights.update({n: value for n in names})
    model.load_state_dict(weights)
    conversations = make_task()
    render = jinja_renderer(DEFAULT_TEMPLATE)
    splits, _ = chat_splits_in_memory(conversations, ByteTokenizer().encode, render, 0.1)
    questions = [m for split, m in split_stream(conversations, 0.1) if split == "val"]
    window = cfg.model.seq_len + 1
    longest = int(max(splits["train"].lengths.max(), splits["val"].lengths.max()))
    if longest > window:
        raise ConfigError(
            f"model.seq_len: the task's conversations need {longest - 1} positions; raise it"
        )
    w = InstructionTask(
        model,
        splits["train"],
        splits["val"],
        window,
        cfg.data.loss_on,
        cfg.data.packing,
        resolve_device(cfg.train.device),
        cfg.train.eval_samples,
        questions=questions,
    )
    w.extras["tokenizer"] = ByteTokenizer()
    w.extras["chat_template"] = DEFAULT_TEMPLATE
    w.name = "instruct"
    return w
