"""The built-in workloads' kind: every tensor on the training device, indexed directly.

Small data sets (MNIST's 5,000 images, digits, breast cancer) and the packed token blocks of a
corpus fit on the device whole, so a micro-batch is one indexing op and no loader is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cadence.runtime.distributed import all_reduce_sums
from cadence.workloads.protocol import Workload, val_ranges

if TYPE_CHECKING:
    from cadence.runtime.distributed import World


class TensorWorkload(Workload):
    """Tensors on the training device plus the model; subclasses define loss and evaluation."""

    def __init__(
        self,
        model: nn.Module,
        x_train: Tensor,
        y_train: Tensor | None,
        x_val: Tensor,
        y_val: Tensor | None,
        eval_samples: int | None,
    ) -> None:
        super().__init__()
        self.model = model
        self.x_train, self.y_train = x_train, y_train
        self.x_val, self.y_val = x_val, y_val
        self.limit_eval(eval_samples)

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def val_size(self) -> int:
        return len(self.x_val)

    def inputs(self, x: Tensor) -> Tensor:
        """Stored examples -> what the model takes; a subclass that stores a compact form
        (int16 audio) widens here, so training, evaluation and export all feed the same thing."""
        return x

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The micro-batch for the given training-set indices."""
        idx = indices.to(self.x_train.device)
        return self.inputs(self.x_train[idx]), self.y_train[idx]

    def _val_batches(self, size: int = 256, world: World | None = None):
        """This process's share of the validation set, in batches (see `val_ranges`)."""
        for a, b in val_ranges(self.n_val, size, world):
            y = self.y_val[a:b] if self.y_val is not None else None
            yield self.inputs(self.x_val[a:b]), y


class ClassificationWorkload(TensorWorkload):
    metric = "val_accuracy"
    higher_is_better = True

    def loss_sum(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x).float(), y, reduction="sum")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, world: World | None = None) -> dict[str, float]:
        total, correct = torch.zeros((), dtype=torch.float64), 0
        for x, y in self._val_batches(world=world):
            logits = model(x).float()
            total += F.cross_entropy(logits, y, reduction="sum").double().cpu()
            correct += int((logits.argmax(-1) == y).sum())
        total_sum, correct_sum = all_reduce_sums([float(total), correct], world)
        return {"val_loss": total_sum / self.n_val, "val_accuracy": correct_sum / self.n_val}


class LogRegWorkload(TensorWorkload):
    """L2-regularised logistic regression in float64, scored by suboptimality J(theta) - J*."""

    metric = "suboptimality"

    def __init__(self, *args, l2: float, j_star: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.l2 = l2
        self.j_star = j_star

    def _penalty(self, model: nn.Module) -> Tensor:
        w = model.linear.weight
        return 0.5 * self.l2 * (w * w).sum()

    def loss_sum(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        data = F.binary_cross_entropy_with_logits(model(x), y, reduction="sum")
        # The penalty is spread over the units so that sum / global units = mean loss + penalty.
        return data + x.shape[0] * self._penalty(model)

    @torch.no_grad()
    def objective(self, model: nn.Module) -> float:
        """J(theta) on the full training set, the quantity whose optimum J* is known."""
        logits = model(self.x_train)
        j = F.binary_cross_entropy_with_logits(logits, self.y_train) + self._penalty(model)
        return float(j)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, world: World | None = None) -> dict[str, float]:
        # Full-batch and tiny (a few hundred examples): every rank computes it whole.
        j = self.objective(model)
        x_val, y_val = self.x_val[: self.n_val], self.y_val[: self.n_val]
        logits = model(x_val)
        val = F.binary_cross_entropy_with_logits(logits, y_val)
        acc = float(((logits > 0).to(y_val.dtype) == y_val).double().mean())
        return {
            "val_loss": float(val),
            "val_accuracy": acc,
            "objective": j,
            "suboptimality": max(j - self.j_star, 0.0),
        }


class NextTokenLoss:
    """Next-token cross-entropy over (inputs, targets) batches, summed over target tokens:
    the loss of every language-model workload (blocks on the device, or a prepared corpus)."""

    def units(self, batch: tuple[Tensor, Tensor]) -> int:
        return batch[1].numel()

    def loss_sum(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")


# ---------------------------------------------------------------- builders
