"""Per-parameter learning rates, set by splitting an optimizer's groups after it is built.

Three rules use it: LoRA+'s faster B matrices (``optimizer.loraplus_ratio``), fine-tuning's
discriminative LR (``optimizer.body_lr_ratio``: the body at a
fraction of the head's LR) and μP's per-layer LRs (a model's ``lr_multipliers()``). Splitting a
built optimizer, rather than teaching every builder about them, keeps each builder's groups and
hyper-parameters as they are and works for the optimizers from packages too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from cadence.models.adapters import lora_b_parameter_ids
from cadence.optim.chained import AnyOptimizer, ChainedOptimizer
from cadence.optim.groups import output_parameter_ids

__all__ = [
    "inner_optimizers",
    "lr_multipliers",
    "scale_body",
    "scale_by_width",
    "scale_lora_b",
    "split_groups",
]


def inner_optimizers(optimizer: AnyOptimizer) -> list[Optimizer]:
    """The torch optimizers behind a ChainedOptimizer (Muon + AdamW), or the optimizer itself."""
    return optimizer.optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]


def scale_body(optimizer: AnyOptimizer, model: nn.Module, ratio: float) -> None:
    """Give every parameter but the output head ``ratio`` times its group's LR.

    Fine-tuning's discriminative LR: the pretrained body moves slowly, the head (often new or
    re-targeted) at the full rate. The head/body decision stays :func:`output_parameter_ids`'s.
    """
    head = output_parameter_ids(model)
    split_groups(
        optimizer,
        lambda p: ("head", 1.0) if id(p) in head else ("body", ratio),
        order=("head", "body"),  # the order checkpoints of earlier versions hold
    )


def scale_lora_b(optimizer: AnyOptimizer, model: nn.Module, ratio: float) -> None:
    """LoRA+ (Hayou et al., 2024): the adapters' B matrices at ``ratio`` times their group's LR.

    B starts at zero and A at random, and with one LR for both the feature-learning update is
    lopsided for wide layers; the paper's fix is a larger LR for B (ratio ~16 for its models).
    """
    b_ids = lora_b_parameter_ids(model)
    split_groups(optimizer, lambda p: ("lora_B", ratio) if id(p) in b_ids else ("", 1.0))


def lr_multipliers(model: nn.Module) -> dict[int, float]:
    """Per-parameter LR factors a model states with ``lr_multipliers()`` (μP's GPT), by id."""
    hook = getattr(model, "lr_multipliers", None)
    if not callable(hook):
        return {}
    named = dict(model.named_parameters(remove_duplicate=False))
    factors = hook()
    unknown = set(factors) - named.keys()
    if unknown:
        raise ValueError(f"lr_multipliers() lists names that are not parameters: {sorted(unknown)}")
    return {id(named[n]): float(f) for n, f in factors.items() if f != 1.0}


def scale_by_width(optimizer: AnyOptimizer, model: nn.Module) -> None:
    """Apply a model's per-parameter LR factors (μP's lr/m for hidden matrices); the registry
    checks first that the optimizer is one they hold for."""
    factors = lr_multipliers(model)
    if not factors:
        return
    split_groups(optimizer, lambda p: ("width", factors[id(p)]) if id(p) in factors else ("", 1.0))


def split_groups(
    optimizer: AnyOptimizer,
    part_of: Callable[[Any], tuple[str, float]],
    order: Sequence[str] = (),
) -> None:
    """Split every group by ``part_of(param) -> (suffix, lr factor)``, the parts in ``order`` of
    their suffixes, then in order of first appearance (saved optimizer state maps by position).

    Done after the optimizer is built (it has no state yet, so this is exact) rather than in
    every builder: each group keeps the hyper-parameters its builder gave, and only its LR (and
    ``base_lr``, which the schedules multiply) changes. A suffix "" keeps the group's name.
    """
    for opt in inner_optimizers(optimizer):
        groups = []
        for g in opt.param_groups:
            parts: dict[tuple[str, float], list[Any]] = {}
            for p in g["params"]:
                parts.setdefault(part_of(p), []).append(p)
            rank = {name: i for i, name in enumerate(order)}
            ordered = sorted(parts.items(), key=lambda kv: rank.get(kv[0][0], len(rank)))
            for (suffix, scale), params in ordered:
                groups.append(
                    {
                        **g,
                        "params": params,
                        "lr": g["lr"] * scale,
                        "base_lr": g["base_lr"] * scale,
                        "group_name": f"{g['group_name']}_{suffix}" if suffix else g["group_name"],
                    }
                )
        opt.param_groups[:] = groups
