"""Which samples a step sees: the global batch at a data position, split for accumulation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from cadence.runtime import distributed
from cadence.runtime.distributed import World
from cadence.schedules import split_micro

if TYPE_CHECKING:
    from cadence.data import EpochSampler
    from cadence.schedules.seq_len import SeqLenSchedule
    from cadence.workloads import Workload


def global_batch(
    workload: Workload,
    sampler: EpochSampler,
    world: World,
    position: int,
    size: int,
    micro_size: int | None,
) -> tuple[list[Any], int]:
    """This process's micro-batches of the global batch of `size` samples starting at sample
    `position`, and the global batch's loss units (tokens for text, samples otherwise).

    Every rank draws the same global batch and keeps its contiguous share: the data order, and
    so the run, do not depend on the number of processes.
    """
    return share_of(workload, sampler.indices(position, size), world, micro_size, pad_to=size)


def share_of(
    workload: Workload,
    everyone: torch.Tensor,
    world: World,
    micro_size: int | None,
    pad_to: int | None = None,
) -> tuple[list[Any], int]:
    """This process's contiguous share of the global batch ``everyone`` (sample indices, the
    same on every rank) as micro-batches of at most ``micro_size``, and the global batch's loss
    units. ``pad_to`` (the global batch size) pads a smaller share with empty micro-batches
    under torch.distributed; a batch with no collective in its forward passes None."""
    indices = distributed.shard(everyone, world)
    sizes = split_micro(len(indices), micro_size) if len(indices) else []
    if world.active and pad_to is not None:
        # Every rank must run as many forward/backward passes as the one with the largest
        # share (DDP broadcasts buffers and FSDP2 gathers parameters in each forward): a
        # smaller share is padded with empty micro-batches, which add nothing to the loss.
        most = split_micro(-(-pad_to // world.size), micro_size)
        sizes += [0] * (len(most) - len(sizes))
    micro, start = [], 0
    for n in sizes:
        micro.append(workload.batch(indices[start : start + n]))
        start += n
    counted = workload.batch_units(everyone)  # a masked loss counts only some tokens
    size = len(everyone)
    units = size * max(1, workload.tokens_per_sample) if counted is None else max(1, counted)
    return micro, units


def cut_to_length(
    micro: list[Any], units: int, seq_len: SeqLenSchedule | None, step: int
) -> tuple[list[Any], int]:
    """A global batch of full-length token sequences at the step's ``schedule.seq_len``; its
    loss units (size * full length) become size * the tokens a sample now trains."""
    if seq_len is None or seq_len.length_at(step) >= seq_len.full:
        return micro, units
    short = [seq_len.shorten(b, step) for b in micro]
    return short, units // seq_len.full * seq_len.tokens_per_sample_at(step)


def trained_tokens(workload: Workload, seq_len: SeqLenSchedule | None, step: int) -> int:
    """Tokens a step trains per sample: fewer while the sequence length warms up with
    ``schedule.seq_len_batch: sequences``."""
    return workload.tokens_per_sample if seq_len is None else seq_len.tokens_per_sample_at(step)


class Prefetcher:
    """Reads the next global batch in a background thread while the current one trains.

    For data read from disk (a prepared corpus): the read (``pread``, stacking, pinning) and
    the host-to-device copy then overlap the step's compute instead of preceding it. Which
    samples a batch holds is a function of (position, size) alone, so prefetching changes no
    number: a request for anything but the batch read ahead (after a rollback, say) waits for
    the read in flight, drops it and reads what was asked, in this thread.

    Why a thread of our own and not ``torch.utils.data.DataLoader``: a batch here is addressed
    by its position in the sample stream, which the loader's iterator does not expose, and the
    cost to hide is one small read per step, not decoding that needs worker processes.

    On CUDA the copy runs on a side stream; the consumer's stream waits on it, and each tensor
    is marked as used there so the caching allocator does not hand its memory out early.
    """

    def __init__(self, fetch: Callable[[int, int], tuple[list[Any], int]], device: Any) -> None:
        self.fetch = fetch
        self.cuda = getattr(device, "type", None) == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="cadence-prefetch")
        self.ahead: tuple[tuple[int, int], Future] | None = None
        self.hits = 0

    def _read(self, position: int, size: int) -> tuple[tuple[list[Any], int], Any]:
        if self.stream is None:
            return self.fetch(position, size), None
        with torch.cuda.stream(self.stream):
            out = self.fetch(position, size)
            done = torch.cuda.Event()
            done.record(self.stream)
        return out, done

    def get(self, position: int, size: int, next_size: int) -> tuple[list[Any], int]:
        """The batch at (position, size); the one at (position + size, next_size) is read next."""
        if self.ahead is not None and self.ahead[0] == (position, size):
            (out, done), self.hits = self.ahead[1].result(), self.hits + 1
        else:
            if self.ahead is not None:  # one reader of the workload at a time
                with contextlib.suppress(Exception):  # an unwanted batch's error is not ours
                    self.ahead[1].result()
            out, done = self._read(position, size)
        if done is not None:
            current = torch.cuda.current_stream(self.stream.device)  # type: ignore[union-attr]
            current.wait_event(done)
            for tensor in _tensors(out[0]):
                tensor.record_stream(current)
        self.ahead = (
            (position + size, next_size),
            self.pool.submit(self._read, position + size, next_size),
        )
        return out

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead[1].cancel()
        self.pool.shutdown(wait=True)
        self.ahead = None


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)
