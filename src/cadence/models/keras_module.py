"""Keras 3 models trained by cadence: on Keras' torch backend a model is already a torch module.

With ``KERAS_BACKEND=torch`` a ``keras.Model`` subclasses ``torch.nn.Module`` and its variables
are torch Parameters, so cadence's optimizers, schedules, checkpoints and DDP can work on it
directly. Three things stand in the way, and :class:`KerasModule` handles each:

- **Names.** Keras registers its variables under paths that carry the process's layer counters
  (``sequential_1/dense_2/kernel`` for the second model built), and twice (``_torch_params``
  and ``_functional._torch_params``), so a checkpoint written by one process would not load in a
  process that built another model first. The adapter holds the Keras model unregistered and
  registers each variable once, under its layer's place and kind and its own name
  (``keras.3_dense.kernel``): stable for the same architecture, whatever else was built.
- **Training mode.** Keras layers (dropout, batch normalisation) read a ``training`` argument,
  not torch's ``module.training``; the adapter passes the one as the other.
- **Roles.** cadence's parameter rules (no weight decay on biases, norms and embeddings; Muon on
  hidden matrices only, never the output head) look for ``nn.Linear`` and ``nn.Embedding``.
  The adapter names them from Keras' layers instead: ``Dense`` kernels are the matrices, the
  last ``Dense`` is the head, ``Embedding`` tables the embeddings. Convolution kernels stay with
  AdamW, as torch's do.

Non-trainable variables (batch-norm statistics, the dropout seed) are registered too, with
``requires_grad`` off: no optimizer touches them, but checkpoints hold them, so a resumed run
draws the same dropout masks and normalises with the same statistics.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

__all__ = ["KerasModule", "as_torch_module", "is_keras_model"]


def is_keras_model(obj: Any) -> bool:
    """Whether ``obj`` is a Keras layer or model. Keras is only looked at if the caller already
    imported it: a cadence run without Keras never pays its import."""
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(obj, keras.layers.Layer)


def as_torch_module(model: Any) -> Any:
    """A Keras model wrapped for cadence; anything else as it is."""
    return KerasModule(model) if is_keras_model(model) else model


def _layers(model: Any) -> list[Any]:
    """Every layer inside ``model``, nested models included, in the order Keras builds them."""
    out = []
    for layer in model.layers if hasattr(model, "layers") else []:
        out.append(layer)
        out += _layers(layer)
    return out


def _owned(model: Any) -> dict[str, list[Any]]:
    """The model's variables by the innermost layer holding them, keyed by that layer's place
    and kind (``3_dense``): stable names, and one group per layer for train.inspect_every."""
    owner: dict[int, str] = {}
    for j, layer in enumerate(_layers(model)):
        for variable in layer.variables:  # a nested layer comes after its parent: it wins
            owner[id(variable.value)] = f"{j}_{type(layer).__name__.lower()}"
    out: dict[str, list[Any]] = {}
    for variable in model.variables:
        out.setdefault(owner.get(id(variable.value), "model"), []).append(variable)
    return out


class KerasModule(nn.Module):
    """A built Keras model (torch backend) as a torch module with stable parameter names."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        keras = sys.modules["keras"]
        if keras.backend.backend() != "torch":
            raise ValueError(
                f"a Keras model on the {keras.backend.backend()} backend: cadence trains Keras "
                "models on the torch backend; set KERAS_BACKEND=torch before importing keras"
            )
        if not model.built:
            raise ValueError(
                "the Keras model is not built: give it a keras.Input (or call model.build(shape)) "
                "so that its weights exist before training"
            )
        object.__setattr__(self, "keras_model", model)  # unregistered: see the module doc
        self.keras = nn.ModuleDict()
        self._names: dict[int, str] = {}  # id(Parameter) -> its name here
        for key, variables in _owned(model).items():
            table = nn.ParameterDict()
            for variable in variables:
                name = variable.name
                while name in table:
                    name += "_"
                table[name] = variable.value  # the same Parameter object Keras updates
                self._names[id(variable.value)] = f"keras.{key}.{name}"
            self.keras[key] = table
        layers = _layers(model)
        dense = [x for x in layers if isinstance(x, keras.layers.Dense)]
        self._head = self._of(dense[-1:], ("kernel", "bias"))
        self._matrices = self._of(dense[:-1], ("kernel",))
        embeddings = [x for x in layers if isinstance(x, keras.layers.Embedding)]
        self._embeddings = self._of(embeddings, ("embeddings",))

    def _of(self, layers: list[Any], attrs: tuple[str, ...]) -> set[str]:
        return {
            self._names[id(getattr(layer, a).value)]
            for layer in layers
            for a in attrs
            if getattr(layer, a, None) is not None
        }

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.keras_model(*args, training=self.training, **kwargs)

    # the hooks of cadence.optim.groups: which parameter plays which role
    def output_parameter_names(self) -> set[str]:
        return set(self._head)

    def hidden_matrix_names(self) -> set[str]:
        return set(self._matrices)

    def embedding_parameter_names(self) -> set[str]:
        return set(self._embeddings)
