"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

torch has no Lion, so this is the one optimizer cadence implements itself. It follows the
layout of torch's own optimizers: a for-loop path (``_single_tensor_lion``) that is easy to
read and check, and a ``torch._foreach_*`` path (``_multi_tensor_lion``) that launches one
kernel per op per device/dtype bucket instead of one per parameter; the tests hold the two
to each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach

__all__ = ["Lion", "lion"]


class Lion(Optimizer):
    """Sign-of-momentum optimizer.

    Each coordinate moves by exactly ``lr`` per step, so Lion's LR is typically 3-10x smaller
    than AdamW's and its weight decay 3-10x larger to keep ``lr * weight_decay`` similar.
    The only state is one momentum buffer (``"exp_avg"``), half of Adam's memory.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        if isinstance(lr, Tensor):
            raise ValueError("Invalid learning rate: Lion takes lr as a float")
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Older pickles may predate a default; fill it so step() can read every key.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
    ) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Lion does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one update; ``closure`` re-evaluates the loss with grad enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs)
            beta1, beta2 = group["betas"]
            lion(
                params,
                grads,
                exp_avgs,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                foreach=group["foreach"],
            )
        return loss


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    foreach: bool | None = None,
) -> None:
    """Functional Lion; picks the foreach path when asked or when torch says it pays off."""
    if not params:
        return
    if foreach is None:
        # True only when every tensor sits on a device with foreach kernels (e.g. CUDA);
        # on CPU the per-tensor loop is as fast and allocates less.
        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    fn = _multi_tensor_lion if foreach else _single_tensor_lion
    fn(
        params,
        grads,
        exp_avgs,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        maximize=maximize,
    )


def _single_tensor_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        if maximize:
            grad = -grad
        # Interpolate with the *old* momentum for the step direction, then refresh the
        # momentum with a different beta: this two-beta trick is what makes Lion work.
        direction = exp_avg.lerp(grad, 1 - beta1).sign_()
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(direction, alpha=-lr)
        exp_avg.lerp_(grad, 1 - beta2)


def _multi_tensor_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    # foreach kernels need every list in a call to share device and dtype.
    buckets = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs])
    for (b_params, b_grads, b_exp_avgs), _ in buckets.values():
        if maximize:
            b_grads = torch._foreach_neg(b_grads)
        directions = torch._foreach_lerp(b_exp_avgs, b_grads, 1 - beta1)
        torch._foreach_sign_(directions)
        if weight_decay != 0:
            torch._foreach_mul_(b_params, 1 - lr * weight_decay)
        torch._foreach_add_(b_params, directions, alpha=-lr)
        torch._foreach_lerp_(b_exp_avgs, b_grads, 1 - beta2)
