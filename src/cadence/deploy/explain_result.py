"""What `cadence explain` finds: the attributions of one prediction and how far they hold.

Kept apart from the computation (explain_kinds.py) so the views and the console read it
without importing Captum.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Explanation", "View"]


class View(str, enum.Enum):
    """How an explanation is laid out: the shape of its attributions and what they sit on."""

    TOKENS = "tokens"  # one value per prompt token
    IMAGE = "image"  # (height, width), beside the image
    FEATURES = "features"  # one value per input feature
    SPECTROGRAM = "spectrogram"  # (mel bins, frames), beside the log-mel spectrogram


@dataclass
class Explanation:
    """The attributions of one prediction and the numbers that say how far to trust them."""

    view: View
    attributions: np.ndarray  # summed over embedding dims for tokens; else the input's shape
    predicted: str  # the model's top token or class
    predicted_prob: float
    target: str  # the token or class explained (the prediction unless --target)
    target_prob: float
    score: str  # "logprob" or "logit": what F is
    at_input: float  # F(input), by a plain forward pass
    at_baseline: float  # F(baseline)
    delta: float  # Captum's: sum(attributions) - (F(input) - F(baseline))
    steps: int
    baseline: str  # the baseline, in words
    tokens: list[str] = field(default_factory=list)  # TOKENS: each token's text
    shown: np.ndarray | None = None  # the image, features or log-mel the values sit on
    seconds_per_frame: float = 0.0  # SPECTROGRAM: the hop between frames

    @property
    def score_label(self) -> str:
        return "log p" if self.score == "logprob" else "logit"

    def unit_names(self) -> list[str]:
        """A name per attribution, in the order of ``attributions.ravel()``."""
        a = self.attributions
        if self.view is View.TOKENS:
            return [f"{i}: {t!r}" for i, t in enumerate(self.tokens)]
        if self.view is View.FEATURES:
            return [f"feature {i}" for i in range(a.size)]
        if self.view is View.IMAGE:
            return [f"pixel (row {r}, col {c})" for r, c in np.ndindex(*a.shape)]
        return [f"{f * self.seconds_per_frame:.2f} s, mel bin {m}" for m, f in np.ndindex(*a.shape)]

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` parts with the largest attributions by magnitude, largest first."""
        flat = self.attributions.ravel()
        names = self.unit_names()
        order = np.argsort(-np.abs(flat), kind="stable")[:k]
        return [(names[i], float(flat[i])) for i in order]

    def summary(self) -> list[str]:
        """The lines the console and the HTML page both show."""
        total = float(self.attributions.sum())
        return [
            f"predicted {self.predicted!r} (p = {self.predicted_prob:.4f}); "
            f"explained {self.target!r} (p = {self.target_prob:.4f})",
            f"{self.score_label} = {self.at_input:.4f} at the input, {self.at_baseline:.4f} at "
            f"the baseline ({self.baseline})",
            f"integrated gradients, {self.steps} steps: attributions sum to {total:.4f}, "
            f"convergence delta {self.delta:.2g}",
        ]
