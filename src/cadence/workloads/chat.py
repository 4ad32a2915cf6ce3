"""Chat and instruction tuning: conversations from JSONL, one per row, the loss on the answers.

``data.format: chat | instruction`` with ``data.path`` a JSONL file. Each conversation is
rendered with the model's chat template and encoded (data/chat.py), padded to one window of
``model.seq_len + 1`` tokens (longer ones are cut, and the run says how many). The targets that
do not count (the prompts, with ``data.loss_on: answers``, and the padding always) are
``IGNORE``, and the loss of a global batch is the sum over its counted tokens divided by their
number in the whole global batch (`batch_units`): neither accumulation nor the number of
processes changes it, and a short answer weighs per token what a long one does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cadence.config import Config
from cadence.data import DataError
from cadence.data.chat import (
    DEFAULT_TEMPLATE,
    encode_conversations,
    hf_renderer,
    jinja_renderer,
    read_conversations,
)
from cadence.data.tokenizers import TOKENIZER_FILE, build_tokenizer, load_tokenizer
from cadence.runtime.distributed import all_reduce_sums
from cadence.workloads.hf import hf_tokenizer_dir
from cadence.workloads.tensors import TensorWorkload

if TYPE_CHECKING:
    from cadence.runtime.distributed import World

IGNORE = -100  # cross_entropy's ignore_index: a target the loss does not count


def split_examples(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation rows: every k-th conversation is held out (k = 1 / fraction),
    so the split is seed-free, stable when lines are appended, and spread over the file."""
    if n < 2:
        return np.arange(n), np.arange(0)
    every = max(2, round(1 / val_fraction)) if val_fraction > 0 else n + 1
    rows = np.arange(n)
    val = rows[every - 1 :: every]
    if val.size == 0:
        val = rows[-1:]
    return np.setdiff1d(rows, val), val


class ChatWorkload(TensorWorkload):
    metric = "val_loss"
    unit = "tokens"

    def __init__(
        self,
        model: nn.Module,
        ids: np.ndarray,
        mask: np.ndarray,
        train_rows: np.ndarray,
        val_rows: np.ndarray,
        device: torch.device,
        eval_samples: int | None,
    ) -> None:
        def tensors(rows: np.ndarray) -> tuple[Tensor, Tensor]:
            x = torch.from_numpy(ids[rows, :-1]).to(device)
            y = torch.from_numpy(np.where(mask[rows, 1:], ids[rows, 1:], IGNORE)).to(device)
            return x, y

        x_train, y_train = tensors(train_rows)
        x_val, y_val = tensors(val_rows)
        super().__init__(model, x_train, y_train, x_val, y_val, eval_samples)
        self.tokens_per_sample = ids.shape[1] - 1
        # counted targets per training row, on the host: batch_units needs no device sync
        self._counted = torch.from_numpy(mask[train_rows, 1:].sum(axis=1).astype(np.int64))

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """An empty share (a rank's under torch.distributed) is the first training row with
        nothing counted: its forward runs (a collective under FSDP2), its loss is 0."""
        if len(indices) == 0:
            return self.x_train[:1], torch.full_like(self.y_train[:1], IGNORE)
        return super().batch(indices)

    def units(self, batch: tuple[Tensor, Tensor]) -> int:
        return int((batch[1] != IGNORE).sum())

    def batch_units(self, indices: Tensor) -> int:
        return int(self._counted[indices].sum())

    def loss_sum(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum"
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, world: World | None = None) -> dict[str, float]:
        total, count = 0.0, 0
        for x, y in self._val_batches(size=32, world=world):
            if x.shape[0] == 0:  # an empty share still runs a forward, counting nothing
                x, y = self.x_val[:1], torch.full_like(self.y_val[:1], IGNORE)
            total += float(self.loss_sum(model, (x, y)).double())
            count += int((y != IGNORE).sum())
        total_sum, count_sum = all_reduce_sums([total, count], world)
        loss = total_sum / max(1, count_sum)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def build_chat(
    cfg: Config,
    device: torch.device,
    tokenizer_dir: Path | None,
    build_model: Callable[..., nn.Module],
    val_fraction: float,
) -> ChatWorkload:
    """The chat workload of ``cfg`` (``build_model`` is the registry's, passed in by it).

    The tokenizer is the run's own where it has one (resume, and the ranks after the first),
    else the model folder's (``model.hf``), else cadence's (byte, or BPE trained on the rendered
    conversations). A model folder renders with its own chat template; cadence's tokenizers with
    DEFAULT_TEMPLATE.
    """
    d = cfg.data
    conversations = read_conversations(Path(str(d.path)), d.format)
    hf_dir = hf_tokenizer_dir(cfg)
    if hf_dir is not None:
        render, template = hf_renderer(hf_dir)
    else:
        template = DEFAULT_TEMPLATE
        render = jinja_renderer(template)
    if tokenizer_dir is not None and (tokenizer_dir / TOKENIZER_FILE).is_file():
        tok = load_tokenizer(tokenizer_dir)
    elif hf_dir is not None:
        tok = load_tokenizer(hf_dir)
    else:
        text = "\n".join(render(c, False) for c in conversations) if d.tokenizer == "bpe" else ""
        tok = build_tokenizer(d.tokenizer, text, d.vocab_size)
    window = cfg.model.seq_len + 1
    encoded = encode_conversations(conversations, tok.encode, render, window, d.loss_on)
    train_rows, val_rows = split_examples(len(conversations), val_fraction)
    if train_rows.size == 0 or val_rows.size == 0:
        raise DataError(
            f"data.path: {d.path} holds {len(conversations)} conversation(s); at least 2 are "
            "needed (one held out for validation)"
        )
    empty = int((encoded.mask[:, 1:].sum(axis=1) == 0).sum())
    if empty == len(conversations):
        raise DataError(
            f"model.seq_len: no conversation of {d.path} keeps a token to learn from within "
            f"model.seq_len + 1 = {window} tokens (the prompts fill the window); raise "
            "model.seq_len"
        )
    if encoded.truncated:
        print(
            f"cadence: {encoded.truncated} of {len(conversations)} conversations are longer than "
            f"model.seq_len + 1 = {window} tokens and were cut ({empty} kept nothing to learn "
            "from); raise model.seq_len to keep them whole",
            flush=True,
        )
    w = ChatWorkload(
        build_model(cfg, vocab_size=tok.vocab_size).to(device),
        encoded.ids,
        encoded.mask,
        train_rows,
        val_rows,
        device,
        cfg.train.eval_samples,
    )
    w.extras["tokenizer"] = tok
    w.extras["chat_template"] = template
    return w
