"""The one place that decides which parameter goes to which optimizer group.

Every optimizer in :mod:`cadence.optim.registry` takes its groups from here, so
"no weight decay on norms, biases and embeddings" and "Muon only for hidden
matrices" are each stated once and cannot drift between optimizers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["embedding_parameter_ids", "muon_split", "output_parameter_ids", "param_groups"]

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def embedding_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of embedding weights; ids rather than names so a head tied to an embedding matches.
    A model whose tables are not ``nn.Embedding`` (a Keras model) names them with
    ``embedding_parameter_names()``."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, _EMBEDDINGS)}
    return ids | (_named_ids(model, "embedding_parameter_names") or set())


def _is_no_decay(param: nn.Parameter, embedding_ids: set[int]) -> bool:
    # Decaying gains/biases pulls them toward 0 (not toward their neutral value 1/0 for a
    # norm gain), and decaying embeddings penalises rare tokens that see few gradients.
    return param.ndim < 2 or id(param) in embedding_ids


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    only: Iterable[nn.Parameter] | None = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed group.

    ``only`` restricts the split to a subset (the AdamW half of Muon) while keeping the
    decision rule here. ``named_parameters`` already drops tied duplicates, so a weight
    shared by an embedding and a head is optimized (and decayed or not) exactly once.
    """
    embedding_ids = embedding_parameter_ids(model)
    allowed = None if only is None else {id(p) for p in only}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, param in model.named_parameters():
        if not param.requires_grad or (allowed is not None and id(param) not in allowed):
            continue
        (no_decay if _is_no_decay(param, embedding_ids) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "group_name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group_name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def _named_ids(model: nn.Module, hook: str) -> set[int] | None:
    """Ids of the parameters a model names with ``hook()``, or None when it has no such hook.
    A name that is not a parameter is an error in the model, not something to skip."""
    names_fn = getattr(model, hook, None)
    if not callable(names_fn):
        return None
    all_named = dict(model.named_parameters(remove_duplicate=False))
    names = set(names_fn())
    unknown = names - all_named.keys()
    if unknown:
        raise ValueError(f"{hook}() lists names that are not parameters: {sorted(unknown)}")
    return {id(all_named[n]) for n in names}


def output_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of the output head's parameters.

    A model names its head with ``output_parameter_names()``. Without it we fall back to the
    last ``nn.Linear`` in module order: putting a classifier head under Muon is a known way
    to hurt training, and a single-layer model (logistic regression) has nothing but a head,
    so guessing "last Linear is the head" is the safer mistake.
    """
    named = _named_ids(model, "output_parameter_names")
    if named is not None:
        return named
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return set()
    return {id(p) for p in linears[-1].parameters()}


def _hidden_matrix_ids(model: nn.Module) -> set[int]:
    """Weights that map one hidden space to another: ``nn.Linear`` weights, or the names a
    model lists with ``hidden_matrix_names()`` (a Hugging Face GPT-2 stores them in Conv1D)."""
    named = _named_ids(model, "hidden_matrix_names")
    if named is not None:
        return named
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Return ``(muon_params, adamw_params)``.

    Muon orthogonalises each update, which only makes sense for a matrix that maps one hidden
    space to another. Embeddings (lookup tables, rows updated sparsely), the output head
    (its rows are per-class and should move independently), gains, biases and conv kernels
    are all left to AdamW. Tied params count once and follow the embedding rule.
    """
    linear_weight_ids = _hidden_matrix_ids(model)
    excluded = embedding_parameter_ids(model) | output_parameter_ids(model)
    muon: list[nn.Parameter] = []
    adamw: list[nn.Parameter] = []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_hidden_matrix = (
            param.ndim == 2 and id(param) in linear_weight_ids and id(param) not in excluded
        )
        (muon if is_hidden_matrix else adamw).append(param)
    return muon, adamw
