"""Logistic regression: the convex workload whose exact optimum is known."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LogisticRegression"]


class LogisticRegression(nn.Module):
    """A single Linear(in, 1); with BCE-with-logits loss the objective is convex, so
    optimizers can be measured by their suboptimality gap J(theta) - J*."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape [B] (squeezed so they pair with 0/1 targets of shape [B])."""
        return self.linear(x).squeeze(-1)

    def output_parameter_names(self) -> set[str]:
        """Every parameter: the whole model is the output layer."""
        return {"linear.weight", "linear.bias"}
