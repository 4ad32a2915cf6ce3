"""Exponential moving average of weights, usable from any loop."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from cadence.runtime.distributed import reshard


@torch.no_grad()
def ema_update(shadow: list[Tensor], params: list[Tensor], decay: float) -> None:
    """shadow <- decay * shadow + (1 - decay) * params, as one fused foreach op."""
    torch._foreach_lerp_(
        shadow, [p.detach().to(s.dtype) for p, s in zip(params, shadow)], 1 - decay
    )


@contextmanager
def weights_applied(model: nn.Module, weights: list[Tensor]) -> Iterator[nn.Module]:
    """``model`` with ``weights`` (one per parameter, in order) in place, put back afterwards:
    how an averaged readout (EMA, LAWA) is evaluated or saved without touching the run."""
    # FSDP2: reshard on entry so the parameters are the sharded ones the weights mirror, and
    # on exit so no unsharded copy holding the averaged values outlives the block.
    params = list(reshard(model).parameters())
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, w in zip(params, weights, strict=True):
            p.copy_(w)
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        reshard(model)


class EMA:
    """Float32 shadow weights; `applied(model)` swaps them in for evaluation or export."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in model.parameters()]

    def update(self, model: nn.Module) -> None:
        ema_update(self.shadow, list(model.parameters()), self.decay)

    def applied(self, model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        return weights_applied(model, self.shadow)

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "shadow": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        if list(shadow) != self.names:
            raise KeyError("EMA state does not match the model's parameters")
        self.decay = float(state["decay"])
        for dst, src in zip(self.shadow, shadow.values()):
            dst.copy_(src)
