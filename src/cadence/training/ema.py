"""Exponential moving average of weights, usable from any loop."""

from __future__ import annotations

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


class EMA:
    """Float32 shadow weights; `applied(model)` swaps them in for evaluation or export."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in model.parameters()]

    def update(self, model: nn.Module) -> None:
        ema_update(self.shadow, list(model.parameters()), self.decay)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        # FSDP2: reshard on entry so the parameters are the sharded ones the shadow mirrors, and
        # on exit so no unsharded copy holding the EMA values outlives the block.
        params = list(reshard(model).parameters())
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            reshard(model)

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "shadow": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        if list(shadow) != self.names:
            raise KeyError("EMA state does not match the model's parameters")
        self.decay = float(state["decay"])
        for dst, src in zip(self.shadow, shadow.values()):
            dst.copy_(src)
