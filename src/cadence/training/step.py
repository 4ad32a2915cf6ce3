"""One optimizer step over a global batch made of micro-batches, and its one host read.

`train_step` is the whole step as one plain function (any loop can call it). The Trainer uses
its parts instead, `backward_step` then `read_step`, so that everything a step must know on the
host (is the loss finite, the loss and gradient norm for logging and convergence, did any process
get a signal or run out of time) arrives in a single device-to-host copy, after at most one small
all-reduce under torch.distributed. A read per step is needed anyway: a non-finite step must not
be applied, which only the host can decide (Megatron's found_inf costs the same).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cadence.runtime.distributed import SINGLE, World, all_reduce_mean_, full_tensor, grad_sync

if TYPE_CHECKING:
    from cadence.optim import AnyOptimizer


def autocast_context(device: torch.device, precision: str) -> Callable[[], Any]:
    """bf16 autocast where asked; fp32 runs get a no-op context."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _local_loss(
    model: nn.Module,
    loss_sum: Callable[[nn.Module, Any], Tensor],
    micro_batches: Sequence[Any],
    total_units: float,
    autocast: Callable[[], Any],
    world: World,
) -> Tensor:
    """Backward every micro-batch; this process's share of the global mean loss (no reduce)."""
    total = None
    divisor = total_units / world.size
    for i, batch in enumerate(micro_batches):
        with grad_sync(model, world, last=i == len(micro_batches) - 1), autocast():
            loss = loss_sum(model, batch)
        (loss / divisor).backward()
        # At least float32 (a bf16 loss is widened) but never narrower than the loss: a float64
        # workload (logreg) keeps its precision for logging and the tol_rel_loss criterion.
        part = loss.detach().to(torch.promote_types(loss.dtype, torch.float32))
        total = part if total is None else total + part
    return total / divisor


def accumulate_gradients(
    model: nn.Module,
    loss_sum: Callable[[nn.Module, Any], Tensor],
    micro_batches: Sequence[Any],
    total_units: float,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    world: World = SINGLE,
) -> Tensor:
    """Backward each micro-batch's loss *sum* divided by the units of the whole global batch.

    Dividing by the global count (tokens for text, samples otherwise), not by the number of
    micro-batches, makes the accumulated gradient equal to the gradient of one large batch even
    when micro-batches differ in size. Under DDP/FSDP each rank divides by global/world, since
    their gradient reduction takes the mean over ranks; the gradient all-reduce runs only on the
    last micro-batch. Returns the global mean loss as a device tensor (no host sync).
    """
    local = _local_loss(model, loss_sum, micro_batches, total_units, autocast, world)
    return all_reduce_mean_(local, world)


def grad_norm_and_clip(params: Sequence[Tensor], max_norm: float | None) -> Tensor:
    """The global gradient norm (before clipping), as a device tensor; clips in place if asked."""
    with_grad = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
    if max_norm is not None:
        # clip_grads_with_norm_ takes the *parameters* and scales their .grad; given the grads
        # themselves (whose .grad is None) it finds nothing to clip and silently does nothing.
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm)
    return full_tensor(norm)  # FSDP2: the norm of sharded gradients is a DTensor


def backward_step(
    model: nn.Module,
    optimizer: AnyOptimizer,
    loss_sum: Callable[[nn.Module, Any], Tensor],
    micro_batches: Sequence[Any],
    total_units: int,
    *,
    clip_grad_norm: float | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    params: Sequence[Tensor] | None = None,
    world: World = SINGLE,
) -> tuple[Tensor, Tensor]:
    """zero_grad -> accumulate -> norm/clip, no host sync and no reduce of the loss.

    Returns (this process's share of the mean loss, global gradient norm) as device tensors;
    `read_step` turns them into host numbers with one all-reduce and one read.
    """
    optimizer.zero_grad(set_to_none=True)
    local = _local_loss(model, loss_sum, micro_batches, total_units, autocast, world)
    params = params if params is not None else list(model.parameters())
    return local, grad_norm_and_clip(params, clip_grad_norm)


@dataclass(frozen=True)
class StepRead:
    """What the host knows of a step after its one read."""

    loss: float  # the global mean training loss
    grad_norm: float  # the global gradient norm before clipping
    signal: bool = False  # some process received SIGTERM/SIGINT
    time_up: bool = False  # some process is past train.max_time_s
    elapsed_s: float | None = None  # the run's seconds as all processes agree (time budgets)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def read_step(
    local_loss: Tensor,
    grad_norm: Tensor,
    world: World = SINGLE,
    *,
    signal: bool = False,
    time_up: bool = False,
    elapsed_s: float | None = None,
) -> StepRead:
    """The step's host read. Under torch.distributed one all-reduce (SUM) carries the loss
    shares and the stop flags of every process, so all ranks decide alike; alone, no reduce.
    Float64 throughout, so a float64 loss is read at full precision.

    ``elapsed_s`` (given when time is a budget) rides in the same all-reduce and comes back as
    the mean over processes: the schedules follow time then, and every rank must take the same
    LR, which its own clock alone would not give."""
    if not world.active:
        loss, norm = torch.stack([local_loss.double(), grad_norm.double()]).tolist()
        return StepRead(loss, norm, signal, time_up, elapsed_s)
    values = [float(signal), float(time_up)] + ([] if elapsed_s is None else [elapsed_s])
    flags = torch.tensor(values, dtype=torch.float64, device=local_loss.device)
    reduced = torch.cat([local_loss.double().reshape(1), flags])
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    loss, sig, late, *rest = torch.cat([reduced, grad_norm.double().reshape(1)]).tolist()
    agreed = None if elapsed_s is None else rest[0] / world.size
    return StepRead(loss / world.size, rest[-1], sig > 0, late > 0, agreed)


def train_step(
    model: nn.Module,
    optimizer: AnyOptimizer,
    loss_sum: Callable[[nn.Module, Any], Tensor],
    micro_batches: Sequence[Any],
    total_units: int,
    *,
    clip_grad_norm: float | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    params: Sequence[Tensor] | None = None,
    check_finite: bool = True,
    world: World = SINGLE,
) -> tuple[Tensor, Tensor, bool]:
    """zero_grad -> accumulate -> norm/clip -> step. Returns (mean loss, grad norm, stepped).

    With `check_finite`, a non-finite gradient norm (NaN/inf anywhere in the loss or the
    gradients) skips `optimizer.step()`, so the weights and optimizer state stay at the last
    good values. That check reads one boolean back from the device each step: a sync, which
    frameworks that guard against overflow (Megatron's found_inf) pay too.
    """
    local, norm = backward_step(
        model,
        optimizer,
        loss_sum,
        micro_batches,
        total_units,
        clip_grad_norm=clip_grad_norm,
        autocast=autocast,
        params=params,
        world=world,
    )
    loss = all_reduce_mean_(local, world)
    if check_finite and not bool(torch.isfinite(norm) & torch.isfinite(loss)):
        return loss, norm, False
    optimizer.step()
    return loss, norm, True
