"""Chat and instruction tuning: conversations as training samples, the loss on the answers.

``data.format: chat | instruction`` with ``data.path`` a JSONL file (read at the start of the
run) or a folder written by ``cadence prepare-data --format chat|instruction`` (read in place
from its shards, so data larger than memory trains). Conversations are rendered with the
model's chat template and encoded (data/chat.py) into the streams of data/chat_streams.py.

A training sample is one conversation padded to a window of ``model.seq_len + 1`` tokens (a
longer one is cut, and the run says how many), or with ``data.packing: true`` a window of whole
conversations packed end to end (chat_streams.pack_examples): positions restart at each one,
and it attends only to itself in the models that take a ``segments`` argument (cadence's GPT,
and Hugging Face models with sdpa or eager attention, through a block-diagonal causal mask).
Validation always scores one conversation per row, so its loss does not depend on packing.

The targets that do not count (the prompts, with ``data.loss_on: answers``; padding and the
first token of a conversation always) are ``IGNORE``, and the loss of a global batch is the sum
over its counted tokens divided by their number in the whole global batch (`batch_units`):
neither accumulation nor the number of processes changes it, and a short answer weighs per
token what a long one does.
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
    TEMPLATE_FILE,
    hf_renderer,
    iter_conversations,
    jinja_renderer,
)
from cadence.data.chat_streams import ChatSplit, chat_splits_in_memory, pack_examples
from cadence.data.tokenizers import TOKENIZER_FILE, build_tokenizer, load_tokenizer
from cadence.runtime.distributed import all_reduce_sums
from cadence.workloads.hf import check_prepared_tokenizer, check_run_tokenizer, hf_tokenizer_dir
from cadence.workloads.protocol import Workload, val_ranges

if TYPE_CHECKING:
    from cadence.runtime.distributed import World

IGNORE = -100  # cross_entropy's ignore_index: a target the loss does not count


class ChatWorkload(Workload):
    metric = "val_loss"
    unit = "tokens"

    def __init__(
        self,
        model: nn.Module,
        train: ChatSplit,
        val: ChatSplit,
        window: int,
        loss_on: str,
        packing: bool,
        device: torch.device,
        eval_samples: int | None,
        on_disk: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.train, self.val = model, train, val
        self.window, self.loss_on, self.device = window, loss_on, device
        self.tokens_per_sample = window - 1
        self.prefetch = on_disk  # reads from shards overlap the step (Prefetcher)
        self.packs = pack_examples(train.lengths, window) if packing else None
        self.limit_eval(eval_samples)

    @property
    def n_train(self) -> int:
        return self.train.n_examples if self.packs is None else len(self.packs) - 1

    @property
    def val_size(self) -> int:
        return self.val.n_examples

    def truncated(self) -> int:
        """Training conversations longer than the window (cut)."""
        return int((self.train.lengths > self.window).sum())

    def _examples(self, indices: np.ndarray) -> list[np.ndarray]:
        """The training examples of each sample (one, or a pack's)."""
        if self.packs is None:
            return [indices[i : i + 1] for i in range(len(indices))]
        return [np.arange(self.packs[i], self.packs[i + 1]) for i in indices.tolist()]

    def _row(self, split: ChatSplit, examples: np.ndarray) -> tuple[np.ndarray, ...]:
        """One window: ids, counted-target flags and segment ids (padding: a segment of its
        own). Consecutive examples are contiguous in the stream: one read."""
        a, b = int(split.starts[examples[0]]), int(split.starts[examples[-1] + 1])
        n = min(b - a, self.window)
        ids = np.zeros(self.window, dtype=np.int64)
        counted = np.zeros(self.window, dtype=bool)
        seg = np.full(self.window, len(examples), dtype=np.int64)
        ids[:n] = split.tokens.read(a, n)
        counted[:n] = split.answers.read(a, n) > 0 if self.loss_on == "answers" else True
        lengths = np.diff(split.starts[examples[0] : examples[-1] + 2])
        seg[:n] = np.repeat(np.arange(len(examples)), lengths)[:n]
        return ids, counted, seg

    def _rows(self, split: ChatSplit, groups: list[np.ndarray]) -> tuple[Tensor, Tensor, Tensor]:
        rows = [self._row(split, g) for g in groups]
        ids = np.stack([r[0] for r in rows])
        counted = np.stack([r[1] for r in rows])
        seg = np.stack([r[2] for r in rows])
        # a target counts where the next token does and belongs to the same conversation
        keep = counted[:, 1:] & (seg[:, 1:] == seg[:, :-1])
        y = np.where(keep, ids[:, 1:], IGNORE)
        out = (ids[:, :-1], y, seg[:, :-1])
        return tuple(self._to_device(torch.from_numpy(np.ascontiguousarray(t))) for t in out)

    def _to_device(self, t: Tensor) -> Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def batch(self, indices: Tensor) -> tuple[Tensor, ...]:
        """(inputs, targets) -- plus segment ids when packed. An empty share (a rank's under
        torch.distributed) is the first training sample with nothing counted: its forward runs
        (a collective under FSDP2), its loss is 0."""
        idx = indices.cpu().numpy().astype(np.int64)
        empty = idx.size == 0
        x, y, seg = self._rows(self.train, self._examples(idx[:1] if empty else idx))
        if empty:
            y = torch.full_like(y, IGNORE)
        return (x, y) if self.packs is None else (x, y, seg)

    def units(self, batch: tuple[Tensor, ...]) -> int:
        return int((batch[1] != IGNORE).sum())

    def batch_units(self, indices: Tensor) -> int:
        """Counted targets of the samples, from the answer flags alone (no token is read)."""
        idx = indices.cpu().numpy().astype(np.int64)
        total = 0
        for examples in self._examples(idx):
            for e in examples.tolist():
                a, n = int(self.train.starts[e]), min(int(self.train.lengths[e]), self.window)
                if n < 2:
                    continue
                if self.loss_on == "all":
                    total += n - 1
                else:
                    total += int(self.train.answers.read(a + 1, n - 1).sum())
        return total

    def loss_sum(self, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        x, y = batch[0], batch[1]
        logits = model(x) if len(batch) == 2 else model(x, segments=batch[2])
        return F.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum"
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, world: World | None = None) -> dict[str, float]:
        total, count = 0.0, 0
        for a, b in val_ranges(self.n_val, 32, world):
            # an empty share still runs a forward (a collective under FSDP2), counting nothing
            rows = [np.array([i]) for i in range(a, b)] or [np.array([0])]
            x, y, _ = self._rows(self.val, rows)
            if a == b:
                y = torch.full_like(y, IGNORE)
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

    A prepared folder brings its tokenizer and template. For a JSONL file the tokenizer is the
    run's own where it has one (resume, and the ranks after the first), else the model folder's
    (``model.hf``), else cadence's (byte, or BPE trained on the rendered conversations). A model
    folder renders with its own chat template; cadence's tokenizers with DEFAULT_TEMPLATE.
    """
    d = cfg.data
    path = Path(str(d.path)).expanduser()
    window = cfg.model.seq_len + 1
    if path.is_dir():
        from cadence.data.prepare_chat import open_prepared_chat

        splits, tok, template, n = open_prepared_chat(path, d.format)
        check_prepared_tokenizer(cfg, path)
        check_run_tokenizer(tokenizer_dir, path)
        on_disk = True
    else:
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
        elif d.tokenizer == "bpe":
            text = "\n".join(render(c, False) for c in iter_conversations(path, d.format))
            tok = build_tokenizer(d.tokenizer, text, d.vocab_size)
        else:
            tok = build_tokenizer(d.tokenizer, "", d.vocab_size)
        conversations = iter_conversations(path, d.format)
        splits, n = chat_splits_in_memory(conversations, tok.encode, render, val_fraction)
        if n == 0:
            raise DataError(f"data.path: {path} holds no conversations")
        on_disk = False
    if splits["train"].n_examples == 0 or splits["val"].n_examples == 0:
        raise DataError(
            f"data.path: {d.path} holds {n} conversation(s); at least 2 are needed (one held "
            "out for validation)"
        )
    w = ChatWorkload(
        build_model(cfg, vocab_size=tok.vocab_size).to(device),
        splits["train"],
        splits["val"],
        window,
        d.loss_on,
        d.packing,
        device,
        cfg.train.eval_samples,
        on_disk=on_disk,
    )
    probe = w.n_train if not on_disk else min(w.n_train, 4096)  # disk: not a whole pass
    if w.batch_units(torch.arange(probe)) == 0:
        raise DataError(
            f"model.seq_len: no conversation of {d.path} keeps a token to learn from within "
            f"model.seq_len + 1 = {window} tokens (the prompts fill the window); raise "
            "model.seq_len"
        )
    if cut := w.truncated():
        print(
            f"cadence: {cut} of {splits['train'].n_examples} training conversations "
            f"are longer than model.seq_len + 1 = {window} tokens and were cut; raise "
            "model.seq_len to keep them whole",
            flush=True,
        )
    w.extras["tokenizer"] = tok
    w.extras["chat_template"] = template
    return w


__all__ = ["IGNORE", "TEMPLATE_FILE", "ChatWorkload", "build_chat"]
