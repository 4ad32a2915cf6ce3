"""Several optimizers driven as one (Muon for hidden matrices + AdamW for the rest).

Why not a ``torch.optim.Optimizer`` subclass: an Optimizer owns a single ``defaults`` dict
and one ``state``/``param_groups`` bookkeeping with one update rule, while Muon refuses any
parameter that is not 2-D. The honest way to run two update rules is to keep two real torch
optimizers and forward to both. The trainer only needs what this class offers
(``param_groups`` for LR multipliers, ``step``, ``zero_grad``, ``state_dict``), so torch LR
schedulers, which insist on an ``Optimizer`` instance, are deliberately not supported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["AnyOptimizer", "ChainedOptimizer"]


class ChainedOptimizer:
    """Forward every optimizer call to a fixed list of inner optimizers."""

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        if not optimizers:
            raise ValueError("ChainedOptimizer needs at least one optimizer")
        seen: set[int] = set()
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        # Two update rules on one tensor would silently sum their steps.
                        raise ValueError("a parameter appears in more than one inner optimizer")
                    seen.add(id(p))
        self.optimizers: list[Optimizer] = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizers' own group dicts, so writing ``group["lr"]`` reaches them."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> MappingProxyType[Any, Any]:
        """Read-only merged view; each parameter's state lives in exactly one inner optimizer."""
        merged: dict[Any, Any] = {}
        for opt in self.optimizers:
            merged.update(opt.state)
        return MappingProxyType(merged)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate ``closure`` once (not once per inner optimizer), then step each."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict.get("optimizers")
        if not isinstance(inner, list) or len(inner) != len(self.optimizers):
            got = len(inner) if isinstance(inner, list) else "no"
            raise ValueError(
                f"state_dict holds {got} optimizer states but this ChainedOptimizer has "
                f"{len(self.optimizers)}"
            )
        for opt, sd in zip(self.optimizers, inner):
            opt.load_state_dict(sd)

    def __repr__(self) -> str:
        inner = ", ".join(type(opt).__name__ for opt in self.optimizers)
        return f"ChainedOptimizer([{inner}])"


# What every builder returns and every consumer accepts: a torch optimizer, or several chained.
# Here, beside the class, so each optimizer module names the same type without a cycle.
AnyOptimizer = Optimizer | ChainedOptimizer
