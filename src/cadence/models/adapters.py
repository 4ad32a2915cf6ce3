"""Adapters on a frozen model (``model.peft``): LoRA and DoRA, built by the `peft` library.

The adapter layers, their initialisation, scaling (``alpha / r``, or ``alpha / sqrt(r)`` with
rsLoRA), DoRA's magnitude vectors, the freezing of everything else and the merge are peft's
(``LoraConfig`` + ``inject_adapter_in_model``, ``LoraLayer.merge``). They are injected into the
model in place rather than by wrapping it in a ``PeftModel``: the model keeps its class and
its interface (cadence's GPT, the HF wrapper, a user's module), so every strategy, checkpoint
and distributed path sees the same object as without adapters; only the parameter names gain
peft's ``base_layer`` / ``lora_A.default`` / ``lora_B.default`` parts.

What cadence adds, because peft does not do it for every model: ``all-linear`` on a model
that is not a Hugging Face ``PreTrainedModel`` (every linear layer but the output head, as
peft chooses for HF models), one-line errors naming the key, and the merged model for export.

peft is imported lazily: it costs seconds and only adapter runs need it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = [
    "add_adapters",
    "has_adapters",
    "lora_b_parameter_ids",
    "merge_adapters",
]

# peft names every adapter parameter with one of these parts (adapter "default").
_ADAPTER_PARTS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.")


def has_adapters(model: nn.Module) -> bool:
    return any(any(part in n for part in _ADAPTER_PARTS) for n, _ in model.named_parameters())


def lora_b_parameter_ids(model: nn.Module) -> set[int]:
    """The B matrices (LoRA+'s faster half): peft's ``lora_B`` of every adapted layer."""
    return {id(p) for n, p in model.named_parameters() if ".lora_B." in n}


def _all_linear(model: nn.Module, head_ids: set[int]) -> list[str]:
    """Every ``nn.Linear`` (and transformers' Conv1D, GPT-2's linear) but the output head."""
    kinds: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds += (Conv1D,)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return [
        name
        for name, m in model.named_modules()
        if name
        and isinstance(m, kinds)
        and not any(id(p) in head_ids for p in m.parameters(recurse=False))
    ]


def add_adapters(model: nn.Module, spec: Any, head_ids: set[int]) -> nn.Module:
    """Inject ``spec`` (a ``model.peft`` section) into ``model`` in place; the adapted module.

    ``model`` is the module whose linear layers are adapted: the HF wrapper passes its inner
    transformers model, cadence's GPT itself. ``head_ids`` are the output head's parameters,
    left out of ``all-linear``. Raises ValueError naming the key when nothing matches.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    if spec.target_modules == "all-linear":
        targets: list[str] = _all_linear(model, head_ids)
        if not targets:
            raise ValueError("model.peft.target_modules: all-linear found no linear layer to adapt")
    else:
        targets = list(spec.target_modules)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        use_rslora=spec.rslora,
        use_dora=spec.method == "dora",
        bias="none",
    )
    try:
        inject_adapter_in_model(config, model)
    except ValueError as exc:  # peft's NoMatchingPeftModuleError is a ValueError
        text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"model.peft.target_modules: {text}") from None
    adapted = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    heads = [m for m in adapted if any(id(p) in head_ids for p in m.parameters())]
    if heads:
        raise ValueError(
            "model.peft.target_modules: the output head is among the adapted modules; name the "
            "hidden layers only (it is tied to the embedding or trained in full otherwise)"
        )
    return model


def merge_adapters(model: nn.Module) -> int:
    """Fold every adapter into its base layer (peft's ``merge``) and put the base layer back in
    its place: a model with the original structure and names. The number of layers merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer) or not name:
            continue
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
        merged += 1
    return merged
