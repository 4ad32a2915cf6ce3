"""One optimizer step over a global batch made of micro-batches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cadence.training.distributed import SINGLE, World, all_reduce_mean_, full_tensor, grad_sync


def autocast_context(device: torch.device, precision: str) -> Callable[[], Any]:
    """bf16 autocast where asked; fp32 runs get a no-op context."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


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
    return all_reduce_mean_(total / divisor, world)


def grad_norm_and_clip(params: Sequence[Tensor], max_norm: float | None) -> Tensor:
    """The global gradient norm (before clipping), as a device tensor; clips in place if asked."""
    with_grad = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
    if max_norm is not None:
        # clip_grads_with_norm_ takes the *parameters* and scales their .grad; given the grads
        # themselves (whose .grad is None) it finds nothing to clip and silently does nothing.
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm)
    return full_tensor(norm)  # FSDP2: the norm of sharded gradients is a DTensor


def train_step(
    model: nn.Module,
    optimizer: Any,
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
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, loss_sum, micro_batches, total_units, autocast, world)
    params = params if params is not None else list(model.parameters())
    norm = grad_norm_and_clip(params, clip_grad_norm)
    if check_finite and not bool(torch.isfinite(norm) & torch.isfinite(loss)):
        return loss, norm, False
    optimizer.step()
    return loss, norm, True
