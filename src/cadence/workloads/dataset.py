"""`DatasetWorkload`: a user's `nn.Module` and map-style datasets as a cadence workload.

The helper most users need instead of writing the protocol: ``train`` and ``val`` are
``torch.utils.data.Dataset`` s of ``(input, target)`` pairs (anything with ``__len__`` and
``__getitem__``), ``loss(output, target)`` is an ordinary mean-reduced loss (``F.cross_entropy``),
``metric`` is ``"val_loss"``, ``"val_accuracy"`` or a callable ``metric(output, target)`` that
returns the batch's mean. cadence keeps owning the sample order: the trainer asks for samples by
index, so resume is exact by sample count and results do not depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from cadence.models.keras_module import as_torch_module
from cadence.runtime.distributed import all_reduce_sums
from cadence.workloads.protocol import Workload, val_ranges

if TYPE_CHECKING:
    from cadence.runtime.distributed import World

Loss = Callable[[Any, Any], Tensor]


class DatasetWorkload(Workload):
    """A model, two datasets and a loss; see the module docstring.

    A micro-batch is ``(input, target, n)``: the collated samples on the model's device and how
    many of them count. An empty micro-batch (a rank whose share of a small global batch is
    empty under torch.distributed) is the first training sample with ``n = 0``: its forward and
    backward still run, as DDP and FSDP2 need on every rank, and add nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Any,
        val: Any,
        loss: Loss,
        metric: str | Callable[[Any, Any], Any] = "val_loss",
        *,
        higher_is_better: bool | None = None,
        target: float | None = None,
        collate: Callable[[list[Any]], Any] | None = None,
        eval_batch_size: int = 256,
        name: str = "",
    ) -> None:
        super().__init__()
        model = as_torch_module(model)  # a Keras model (torch backend): stable names, roles
        if not isinstance(model, nn.Module):
            raise TypeError(f"DatasetWorkload: model must be an nn.Module, got {type(model)}")
        for what, ds in (("train", train), ("val", val)):
            if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
                raise TypeError(f"DatasetWorkload: {what} must be a map-style Dataset")
            if len(ds) == 0:
                raise ValueError(f"DatasetWorkload: {what} is empty")
        if not callable(loss):
            raise TypeError("DatasetWorkload: loss must be callable, e.g. F.cross_entropy")
        if eval_batch_size < 1:
            raise ValueError(
                f"DatasetWorkload: eval_batch_size must be >= 1, got {eval_batch_size}"
            )
        self.model, self.train_set, self.val_set, self.loss = model, train, val, loss
        self.collate = collate or default_collate
        self.eval_batch_size = eval_batch_size
        self.name, self.target = name, target
        if callable(metric):
            if higher_is_better is None:
                raise ValueError("DatasetWorkload: a callable metric needs higher_is_better")
            self.metric_fn: Callable[[Any, Any], Any] | None = metric
            self.metric = f"val_{getattr(metric, '__name__', 'metric')}"
        elif metric in ("val_loss", "val_accuracy"):
            self.metric_fn = None
            self.metric = metric
        else:
            raise ValueError(
                f"DatasetWorkload: metric must be 'val_loss', 'val_accuracy' or a callable, "
                f"got {metric!r}"
            )
        default = self.metric == "val_accuracy"
        self.higher_is_better = default if higher_is_better is None else bool(higher_is_better)
        self.limit_eval(None)

    @property
    def n_train(self) -> int:
        return len(self.train_set)

    @property
    def val_size(self) -> int:
        return len(self.val_set)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _collate(self, dataset: Any, indices: list[int]) -> tuple[Any, Any, int]:
        n = len(indices)
        x, y = self.collate([dataset[i] for i in (indices or [0])])
        device = self._device()
        return _to(x, device), _to(y, device), n

    def batch(self, indices: Tensor) -> tuple[Any, Any, int]:
        return self._collate(self.train_set, indices.tolist())

    def units(self, batch: tuple[Any, Any, int]) -> int:
        return batch[2]

    def loss_sum(self, model: nn.Module, batch: tuple[Any, Any, int]) -> Tensor:
        x, y, n = batch
        return self.loss(model(x), y).float() * n

    @torch.no_grad()
    def evaluate(self, model: nn.Module, world: World | None = None) -> dict[str, float]:
        total, correct, custom = 0.0, 0.0, 0.0
        for a, b in val_ranges(self.n_val, self.eval_batch_size, world):
            x, y, n = self._collate(self.val_set, list(range(a, b)))
            out = model(x)
            if n == 0:
                continue  # the forward ran (a collective under FSDP2); nothing to count
            total += float(self.loss(out, y)) * n
            if self.metric == "val_accuracy":
                correct += float((out.argmax(-1) == y).sum())
            elif self.metric_fn is not None:
                custom += float(self.metric_fn(out, y)) * n
        total, correct, custom = all_reduce_sums([total, correct, custom], world)
        metrics = {"val_loss": total / self.n_val}
        if self.metric == "val_accuracy":
            metrics["val_accuracy"] = correct / self.n_val
        elif self.metric_fn is not None:
            metrics[self.metric] = custom / self.n_val
        return metrics


def _to(value: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples, lists and dicts, as `default_collate` makes) to `device`."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value
