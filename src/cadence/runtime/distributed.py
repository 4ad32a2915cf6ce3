"""torch.distributed for the trainer: process group, data sharding, DDP/FSDP2 wrapping.

Everything here is PyTorch's own machinery (torchrun's environment, `init_process_group`,
`DistributedDataParallel`, `fully_shard`); cadence only decides *what* each rank computes so that
results do not depend on the number of processes:

- every rank draws the same global batch (the sampler is a pure function of the data position)
  and takes its contiguous share of it;
- each rank divides its loss *sum* by the global unit count times 1/world, so the mean that DDP's
  all-reduce (or FSDP's reduce-scatter) takes is exactly the gradient of the global batch;
- stop decisions are made on values every rank has (the all-reduced loss and gradient norm,
  evaluation on the full validation set) or agreed with one small all-reduce per step.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_world(mode: str, timeout_s: float) -> World:
    """Join the process group torchrun set up (WORLD_SIZE > 1), or return the single process.

    gloo on CPU, nccl on CUDA. The timeout bounds every collective, so a rank that dies makes the
    others fail with an error instead of waiting forever.
    """
    size = env_world_size()
    if size <= 1:
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        backend = "nccl" if cuda else "gloo"
        store = _restart_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            rank = int(os.environ["RANK"])
            dist.init_process_group(
                backend=backend, store=store, rank=rank, world_size=size, timeout=timeout
            )
    resolved = "ddp" if mode == "auto" else mode
    return World(dist.get_rank(), dist.get_world_size(), local_rank, resolved)


def _restart_store(timeout: timedelta) -> dist.Store | None:
    """After a torchrun restart, the process group's store under a prefix of its own.

    torchrun's agent keeps one store for the whole job, and the process group writes its
    connection keys (each rank's address) there under the same names every time; the workers of
    a restart then read the dead workers' addresses and fail to connect ("Connection refused",
    seen with gloo on torch 2.13). A prefix per restart keeps each attempt's keys apart. The
    first attempt uses torch's own env:// rendezvous, unchanged."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt in ("", "0"):
        return None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    rank = int(os.environ["RANK"])
    base = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=env_world_size(),
        is_master=not agent and rank == 0,
        timeout=timeout,
        wait_for_workers=False,
    )
    return dist.PrefixStore(f"cadence/restart_{attempt}", base)


def shutdown(world: World, clean: bool = True) -> None:
    """Tear the process group down; ``clean`` when this rank finished without an error.

    A clean finish waits at a barrier first, so no rank destroys its group while a peer's
    last collective still has gloo traffic in flight: measured on 2 CPU processes under
    FSDP2, about 1 run in 16 otherwise had a rank abort at exit ("terminate called without
    an active exception", exit -6) after a complete run. After an error the barrier is
    skipped: the other ranks may never reach it.
    """
    if world.active and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def shard(indices: Tensor, world: World) -> Tensor:
    """This rank's contiguous share of the global batch (sizes differ by at most one)."""
    if not world.active:
        return indices
    return torch.tensor_split(indices, world.size)[world.rank]


def wrap(model: nn.Module, world: World, precision: str) -> nn.Module:
    """The module the training step calls: DDP around the model, or the model sharded by FSDP2.

    FSDP2 shards each Transformer block (and then the root), so one block's parameters are
    gathered at a time; on CUDA with bf16 it keeps bf16 parameters for compute and reduces
    gradients in fp32.
    """
    if not world.active:
        return model
    if world.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [world.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=device_ids)
    return shard_model(model, precision)


def shard_model(model: nn.Module, precision: str) -> nn.Module:
    """FSDP2 over an initialised process group: each Transformer block, then the root.

    Split out of :func:`wrap` so a check can shard on a one-process group (benchmarks/gpu.py
    runs FSDP2's mixed-precision path on one GPU), which ``wrap`` treats as no distribution.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {}
    if torch.cuda.is_available() and precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for block in getattr(model, "blocks", []):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def grad_sync(step_model: nn.Module, world: World, last: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if not world.active or last:
        if world.mode == "fsdp" and world.active:
            step_model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if world.mode == "ddp":
        return step_model.no_sync()
    step_model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def all_reduce_mean_(value: Tensor, world: World) -> Tensor:
    if world.active:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world.size
    return value


def all_reduce_sums(values: list[float], world: World | None) -> list[float]:
    """Sums over ranks of a few scalars (evaluation totals), in float64 so the order of the
    additions does not show in the result."""
    if world is None or not world.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj: Any, world: World) -> Any:
    if not world.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def full_tensor(value: Tensor) -> Tensor:
    """A DTensor (FSDP2 gradient norm) as a plain tensor; a plain tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------- whole tensors from shards


def whole(value: Any) -> Any:
    """A tensor as one whole CPU tensor (a collective all-gather for an FSDP2 DTensor)."""
    if hasattr(value, "full_tensor"):
        return value.full_tensor().cpu()
    return value.detach().cpu().clone() if isinstance(value, Tensor) else value


def reshard(model: nn.Module) -> nn.Module:
    """FSDP2 keeps the root's parameters unsharded after a forward without backward (an
    evaluation), and the next forward uses them as they are; reshard so the registered parameters
    are the optimizer's DTensors again (before their values are changed in place). A no-op for
    other models."""
    if hasattr(model, "reshard"):
        model.reshard()
    return model


def gather_model_state(model: nn.Module) -> dict[str, Tensor]:
    """Whole weights of a (possibly sharded) model; a collective under FSDP2.

    Only for the final model.safetensors (checkpoints stay sharded): every rank receives the
    whole model for the duration of the write, as `DTensor.full_tensor` all-gathers.
    """
    reshard(model)
    return {name: whole(t) for name, t in model.state_dict().items()}
