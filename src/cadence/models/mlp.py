"""A plain multi-layer perceptron, the simplest non-convex workload."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten, then Linear/ReLU layers; the last Linear produces logits."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int) -> None:
        super().__init__()
        self.check_sizes(in_features, hidden, out_features)
        sizes = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self._out_name = f"net.{len(layers) - 1}"

    @staticmethod
    def check_sizes(in_features: int, hidden: Sequence[int], out_features: int) -> None:
        """The layer-size rule, callable before building (the config check does)."""
        if in_features < 1 or out_features < 1 or any(h < 1 for h in hidden):
            raise ValueError(
                f"model.hidden: layer sizes must be positive, got in={in_features}, "
                f"hidden={list(hidden)}, out={out_features}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, out_features]; any trailing input shape is flattened."""
        return self.net(x.flatten(1))

    def output_parameter_names(self) -> set[str]:
        """The last Linear's weight and bias (routed away from hidden-matrix optimizers)."""
        return {f"{self._out_name}.weight", f"{self._out_name}.bias"}
