"""Sequence-length warmup: a language model trains on short sequences first.

Li, Zhang and He (2022, "The stability-efficiency dilemma") showed that early training on long
sequences is where the loss spikes come from and that starting short and growing to the full
context is both more stable and cheaper; MosaicML's Composer ships it as
``SeqLengthWarmup`` (modded-nanogpt grows its sliding attention window, a relative). Here the
length is a pure function of the step (the same ``[[position, length], ...]`` points as
``schedule.momentum``), so resume stays exact.

Two ways to shorten a batch of ``B`` sequences of ``T`` tokens to length ``L``, chosen by
``schedule.seq_len_batch``:

- ``tokens`` (the default) keeps the batch in tokens: each sequence is cut into ``T // L``
  pieces, so a step trains ``B * (T // L)`` sequences of ``L`` tokens. Every sampled token is
  trained on, the per-step compute of the matmuls is the same and the LR needs no change;
  only attention's reach (and its quadratic cost) grows.
- ``sequences`` keeps the batch in sequences and drops each one's tail (Composer's
  ``truncate``): early steps are cheaper and see fewer tokens, which ``train.max_tokens`` and
  the token counts in ``metrics.jsonl`` reflect.

Lengths are rounded down to a multiple of 8 (at least 8, at most ``T``) as Composer does: fewer
distinct shapes for ``torch.compile`` and kernels that like aligned sizes. Evaluation always
runs at the full length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from cadence.schedules.hparams import PiecewiseLinear, piecewise_linear

__all__ = ["SEQ_LEN_MULTIPLE", "SeqLenSchedule", "seq_len_schedule", "shorten"]

SEQ_LEN_MULTIPLE = 8

KEEP = ("tokens", "sequences")


@dataclass(frozen=True)
class SeqLenSchedule:
    """The training sequence length at each step, and what a batch then holds."""

    points: PiecewiseLinear
    full: int  # the model's context, model.seq_len: the length the samples are cut at
    keep: Literal["tokens", "sequences"] = "tokens"

    def length_at(self, step: int) -> int:
        raw = int(self.points(step))
        return max(min(self.full, SEQ_LEN_MULTIPLE), min(self.full, raw - raw % SEQ_LEN_MULTIPLE))

    def tokens_per_sample_at(self, step: int) -> int:
        """Target tokens a step trains per sampled sequence (``full`` at the full length)."""
        length = self.length_at(step)
        return length if self.keep == "sequences" else (self.full // length) * length

    def shorten(self, batch: tuple[Tensor, Tensor], step: int) -> tuple[Tensor, Tensor]:
        return shorten(batch, self.length_at(step), self.keep)


def shorten(
    batch: tuple[Tensor, Tensor], length: int, keep: Literal["tokens", "sequences"]
) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of shape (B, T) as sequences of ``length`` (see the module doc)."""
    x, y = batch
    t = x.shape[1]
    if length >= t:
        return x, y
    if keep == "sequences":
        return x[:, :length], y[:, :length]
    used = (t // length) * length  # a remainder shorter than `length` is dropped
    return x[:, :used].reshape(-1, length), y[:, :used].reshape(-1, length)


def seq_len_schedule(
    points: Sequence[Sequence[Any]], *, full: int, keep: str, total_steps: int
) -> SeqLenSchedule:
    """Check ``schedule.seq_len`` / ``schedule.seq_len_batch`` against ``model.seq_len``."""
    if keep not in KEEP:
        raise ValueError(
            f"schedule.seq_len_batch: expected 'tokens' (more, shorter sequences) or "
            f"'sequences' (the same sequences, cut short), got {keep!r}"
        )
    schedule = piecewise_linear(points, total_steps, "schedule.seq_len", low=1.0, high=math.inf)
    longest = max(schedule.values)
    if longest > full:
        raise ValueError(
            f"schedule.seq_len: a length of {longest:g} is longer than the samples, "
            f"model.seq_len={full}; end the warmup at model.seq_len"
        )
    return SeqLenSchedule(schedule, full, keep)  # type: ignore[arg-type]
