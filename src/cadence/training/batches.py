"""Which samples a step sees: the global batch at a data position, split for accumulation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cadence.runtime import distributed
from cadence.runtime.distributed import World
from cadence.schedules import split_micro

if TYPE_CHECKING:
    from cadence.data import EpochSampler
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
    indices = distributed.shard(sampler.indices(position, size), world)
    sizes = split_micro(len(indices), micro_size)
    if world.active:
        # Every rank must run as many forward/backward passes as the one with the largest
        # share (DDP broadcasts buffers and FSDP2 gathers parameters in each forward): a
        # smaller share is padded with empty micro-batches, which add nothing to the loss.
        most = split_micro(-(-size // world.size), micro_size)
        sizes += [0] * (len(most) - len(sizes))
    micro, start = [], 0
    for n in sizes:
        micro.append(workload.batch(indices[start : start + n]))
        start += n
    return micro, size * max(1, workload.tokens_per_sample)
