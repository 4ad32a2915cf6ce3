"""Chat data as streams: every example's tokens end to end, an answer flag per token, and where
each example starts -- in memory (a JSONL file read at the start of a run) or as the shards of
``cadence prepare-data --format chat`` (read in place, so a corpus larger than memory trains).

One layout for both, so training, packing and evaluation have one implementation; examples of
a split are contiguous in its stream, in file order, which is what makes packing a window of
whole examples a single read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from cadence.data.chat import Messages, Renderer, encode_conversation

__all__ = [
    "ArrayStream",
    "ChatSplit",
    "Stream",
    "chat_splits_in_memory",
    "pack_examples",
    "split_stream",
    "val_every",
]

T = TypeVar("T")


class Stream(Protocol):
    n_tokens: int

    def read(self, offset: int, length: int) -> np.ndarray: ...


class ArrayStream:
    """An in-memory array with :class:`cadence.data.shards.TokenStream`'s ``read``."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.n_tokens = int(values.size)

    def read(self, offset: int, length: int) -> np.ndarray:
        if offset < 0 or offset + length > self.n_tokens:
            raise IndexError(f"tokens [{offset}, {offset + length}) of {self.n_tokens}")
        return self.values[offset : offset + length].astype(np.int64)


@dataclass
class ChatSplit:
    """One split: ``tokens`` and ``answers`` (1 where a token is part of an answer) are streams
    of the same length; example ``i`` is ``[starts[i], starts[i + 1])`` of them. ``starts`` is
    held in memory: 8 bytes per example, 80 MB for ten million conversations."""

    tokens: Stream
    answers: Stream
    starts: np.ndarray  # int64 [n_examples + 1], the last the stream's length

    @property
    def n_examples(self) -> int:
        return len(self.starts) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)


def val_every(val_fraction: float) -> int:
    """Every k-th conversation is held out, k = 1 / fraction (at least 2); 0: none is."""
    return max(2, round(1 / val_fraction)) if val_fraction > 0 else 0


def split_stream(examples: Iterable[T], val_fraction: float) -> Iterator[tuple[str, T]]:
    """Each example with its split, in order: every k-th is ``"val"`` (seed-free, stable when
    lines are appended, spread over the file); if that leaves validation empty, the last
    example is held out instead (a file shorter than k). Streaming: one example is held back
    until the next arrives, so a file is read once whatever its size."""
    every = val_every(val_fraction)
    pending: T | None = None
    held_out = False
    count = 0
    for i, example in enumerate(examples):
        count = i + 1
        if pending is not None:
            yield "train", pending
            pending = None
        if every and count % every == 0:
            held_out = True
            yield "val", example
        else:
            pending = example
    if pending is not None:
        yield ("train" if held_out or count < 2 else "val"), pending


def chat_splits_in_memory(
    conversations: Iterable[Messages],
    encode: Callable[[str], np.ndarray],
    render: Renderer,
    val_fraction: float,
) -> tuple[dict[str, ChatSplit], int]:
    """Encode conversations into a training and a validation split; and how many there were."""
    parts: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {
        "train": ([], []),
        "val": ([], []),
    }
    n = 0
    for split, messages in split_stream(conversations, val_fraction):
        ids, answers = encode_conversation(messages, encode, render)
        parts[split][0].append(ids)
        parts[split][1].append(answers.astype(np.uint8))
        n += 1
    out = {}
    for split, (ids, answers) in parts.items():
        starts = np.cumsum([0, *(a.size for a in ids)]).astype(np.int64)
        tokens = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        flags = np.concatenate(answers) if answers else np.zeros(0, np.uint8)
        out[split] = ChatSplit(ArrayStream(tokens), ArrayStream(flags), starts)
    return out, n


def pack_examples(lengths: np.ndarray, window: int) -> np.ndarray:
    """Windows of whole examples, in order: example boundaries ``b`` such that window ``j``
    holds examples ``[b[j], b[j + 1])``. Next-fit: an example that does not fit in what is left
    of the current window starts the next one, so no example is split across windows (its
    answers keep their prompt), and one longer than the window is a window alone, cut."""
    bounds = [0]
    used = 0
    for i, n in enumerate(lengths.tolist()):
        n = min(n, window)
        if used and used + n > window:
            bounds.append(i)
            used = 0
        used += n
    if len(lengths):
        bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)
