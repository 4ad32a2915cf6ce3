"""A small convolutional network for 28x28 grayscale digits (the MNIST workload)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Two conv/pool stages and a two-layer classifier: small enough to train on CPU
    in seconds, big enough that optimizer choice visibly matters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] for images [B, 1, 28, 28]."""
        x = self.features(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))

    def output_parameter_names(self) -> set[str]:
        """The classifier layer, which hidden-matrix optimizers (Muon) should not own."""
        return {"fc2.weight", "fc2.bias"}
