"""The language-model workload on a prepared corpus: windows read in place from its shards.

``data.path: DIR`` where DIR is a ``cadence prepare-data`` output. A training sample is a window
of ``model.seq_len + 1`` tokens of the training stream:

- ``data.sampling: packed`` -- window ``i`` is tokens ``[i*(L+1), (i+1)*(L+1))``; the trainer's
  seeded epochs visit every window once per epoch, so an epoch reads every training token once
  (the last partial window aside);
- ``data.sampling: random`` -- the window of stream sample ``k`` starts at ``hash(seed, k)``
  (:class:`cadence.data.RandomOffsets`), any position of the stream.

Either way which tokens a sample holds is a function of (seed, sample index): resuming reads no
skipped data, and the batches do not depend on the number of processes. Only the batch being
trained is read (``pread``, see :class:`cadence.data.shards.TokenStream`), pinned on CUDA and
moved with ``non_blocking``. Evaluation scores a fixed, seed-free set of validation windows spread evenly
through the validation stream, ``train.eval_samples`` of them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from cadence.data import RandomOffsets
from cadence.data.shards import PreparedCorpus, TokenStream
from cadence.runtime.distributed import all_reduce_sums
from cadence.workloads.protocol import Workload, val_ranges
from cadence.workloads.tensors import NextTokenLoss

if TYPE_CHECKING:
    from cadence.runtime.distributed import World


class PreparedLMWorkload(NextTokenLoss, Workload):
    metric = "val_loss"
    unit = "tokens"
    prefetch = True

    def __init__(
        self,
        model: nn.Module,
        corpus: PreparedCorpus,
        seq_len: int,
        sampling: str,
        device: torch.device,
        eval_samples: int | None,
    ) -> None:
        super().__init__()
        self.model = model
        self.corpus = corpus
        self.window = seq_len + 1
        self.tokens_per_sample = seq_len
        self.sampling = sampling
        self.device = device
        self.n_windows = corpus.train.n_tokens // self.window
        self.n_val_windows = corpus.val.n_tokens // self.window
        # Bits per byte of the validation text (the index records each split's bytes).
        split = corpus.index["splits"]["val"]
        if split.get("bytes"):
            self.bytes_per_token = split["bytes"] / max(1, corpus.val.n_tokens)
        else:  # the corpus's average, for an index without per-split bytes
            total = corpus.train.n_tokens + corpus.val.n_tokens
            self.bytes_per_token = corpus.index.get("bytes", total) / max(1, total)
        self.limit_eval(eval_samples)

    @property
    def n_train(self) -> int:
        return self.n_windows

    @property
    def val_size(self) -> int:
        return self.n_val_windows

    def sampler(self, seed: int, shuffle: bool = True) -> Any:
        if self.sampling == "random" and shuffle:
            positions = self.corpus.train.n_tokens - self.window + 1
            return RandomOffsets(self.n_windows, positions, seed)
        return super().sampler(seed, shuffle)

    def _windows(self, stream: TokenStream, starts: np.ndarray) -> Tensor:
        rows = np.stack([stream.read(int(s), self.window) for s in starts]) if len(starts) else (
            np.zeros((0, self.window), dtype=np.int64)
        )  # fmt: skip
        out = torch.from_numpy(rows)
        if self.device.type == "cuda":
            return out.pin_memory().to(self.device, non_blocking=True)
        return out.to(self.device)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Window ids (packed) or token offsets (random) -> (inputs, next-token targets)."""
        idx = indices.cpu().numpy().astype(np.int64)
        starts = idx if self.sampling == "random" else idx * self.window
        blocks = self._windows(self.corpus.train, starts)
        return blocks[:, :-1], blocks[:, 1:]

    def val_starts(self, n: int | None = None) -> np.ndarray:
        """Where the evaluated windows start: ``n`` (default ``n_val``) of them, evenly spaced
        through the validation stream, whatever the seed."""
        n = self.n_val if n is None else min(n, self.n_val_windows)
        chosen = np.arange(n, dtype=np.int64) * self.n_val_windows // max(1, n)
        return chosen * self.window

    def val_blocks(self, n: int) -> Tensor:
        """`n` validation windows of seq_len + 1 tokens (int64), spread as in evaluation."""
        return self._windows(self.corpus.val, self.val_starts(n))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, world: World | None = None) -> dict[str, float]:
        starts = self.val_starts()
        total, count = torch.zeros((), dtype=torch.float64), 0
        for a, b in val_ranges(self.n_val, 64, world):
            blocks = self._windows(self.corpus.val, starts[a:b])
            x, y = blocks[:, :-1], blocks[:, 1:]
            total += self.loss_sum(model, (x, y)).double().cpu()
            count += y.numel()
        total_sum, count_sum = all_reduce_sums([float(total), count], world)
        loss = total_sum / max(1, count_sum)
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / self.bytes_per_token}
