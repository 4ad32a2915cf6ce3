"""What every optimizer entry is made of: the registry's record and the parameter groups.

Apart from registry.py so that the entries built from other packages (packages.py) share them
without importing the registry that lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from cadence.optim.groups import param_groups

if TYPE_CHECKING:
    from cadence.optim.chained import AnyOptimizer

__all__ = ["OptimizerSpec", "stamp", "trainable_groups"]


@dataclass(frozen=True)
class OptimizerSpec:
    """One registry entry.

    ``full_batch`` tells the trainer to feed the whole training set each step (only "gd");
    ``schedule_free`` tells it to toggle train/eval mode around evaluation and checkpoints;
    ``check`` holds the rules only this optimizer has (called by :func:`check_hparams`);
    ``fused`` says torch has a fused kernel for it (``optimizer.fused``);
    ``momentum_key`` names the group key that holds its momentum for ``schedule.momentum``
    (``"momentum"``, or ``"betas"`` whose first entry it is; None: it has none to schedule);
    ``shardable`` False refuses it under FSDP2 (it needs whole tensors or global sums);
    ``lr_free`` marks one that estimates its own step size, so ``optimizer.lr`` is a multiplier
    of the estimate (checked to lie in [0.1, 10]);
    ``width_rule`` says μP's per-layer LRs (``model.parametrization: mup``) hold for it: its
    update's per-entry size does not depend on the gradient's scale (Adam-like or sign-based;
    cadence's Muon rescales its orthogonalised updates to AdamW's RMS), so a hidden matrix
    steps at lr/m. SGD's μP rule is another one, and a preconditioner's
    (SOAP, PSGD) is not settled, so those refuse μP rather than train under the wrong one.
    """

    name: str
    description: str
    build: Callable[..., AnyOptimizer]
    full_batch: bool = False
    schedule_free: bool = False
    check: Callable[..., None] | None = None
    fused: bool = False
    momentum_key: Literal["momentum", "betas"] | None = None
    shardable: bool = True
    lr_free: bool = False
    width_rule: bool = False


def stamp(groups: list[dict[str, Any]], lr: float, prefix: str = "") -> list[dict[str, Any]]:
    for g in groups:
        g["lr"] = lr
        g["base_lr"] = lr
        g["group_name"] = prefix + g["group_name"]
    return groups


def trainable_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    groups = stamp(param_groups(model, weight_decay), lr)
    if not groups:
        raise ValueError("model has no trainable parameters")
    return groups
