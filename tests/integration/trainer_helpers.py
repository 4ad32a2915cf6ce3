"""Shared pieces of the trainer tests (test_trainer_*.py): fit without a run dir, logreg maths.

The closed forms use cadence.data's logreg_loss / logreg_grad with theta = [w..., b] in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cadence.config import Config
from cadence.training import Callback, Trainer, fit
from cadence.workloads import Workload, build_workload

# Tiny models per workload: every test trains for well under a second per step on one core.
TINY: dict[str, list[str]] = {
    "lm": [
        "model.n_layer=1",
        "model.d_model=32",
        "model.n_head=2",
        "model.seq_len=16",
        "data.max_bytes=200000",
        "train.eval_samples=16",
    ],
    "mnist": ["model.arch=mlp", "model.hidden=[32]"],
    "mnist-cnn": ["model.arch=cnn"],
    "digits": ["model.hidden=[32]"],
    "logreg": [],
    # 2 of the 160 synthetic voices (44 clips); a narrow CNN
    "speech": ["data.voices=2", "model.channels=[8,16]", "train.eval_samples=64"],
    # clipped as in the recipe: plain SGD at 0.1 on CTC diverges within 25 steps without it
    "asr": [
        "data.voices=2",
        "model.d_model=32",
        "model.n_layer=1",
        "train.eval_samples=32",
        "train.clip_grad_norm=1.0",
    ],
}


class Recorder(Callback):
    """Keeps every logged row and the trainer; observes only."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.trainer: Any = None

    def on_start(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_log(self, trainer: Any, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))


def run_fit(cfg: Config, workload: Workload | None = None) -> tuple[dict, list[dict], Trainer]:
    """Trainer + fit without a run directory; returns (summary, logged rows, trainer)."""
    rec = Recorder()
    trainer = Trainer(cfg, workload if workload is not None else build_workload(cfg), [rec])
    summary = fit(trainer)
    return summary, rec.rows, trainer


def theta_of(workload: Workload) -> np.ndarray:
    """Logistic-regression parameters as theta = [w..., b] (float64), the layout of logreg_*."""
    lin = workload.model.linear
    return torch.cat([lin.weight.detach().flatten(), lin.bias.detach()]).double().numpy().copy()


def smoothness(workload: Workload) -> float:
    """L = lambda_max(X~^T X~) / (4n) + l2 bounds the Hessian of J (X~ = [X, 1], sigma' <= 1/4)."""
    x = workload.x_train.double().numpy()
    xb = np.hstack([x, np.ones((x.shape[0], 1))])
    return float(np.linalg.eigvalsh(xb.T @ xb).max()) / (4 * x.shape[0]) + workload.l2


def num(x: float) -> str:
    """``x`` spelled so that YAML reads it back as a float (PyYAML takes ``1e-12`` for a string)."""
    mantissa, e, exponent = repr(float(x)).partition("e")
    if e and "." not in mantissa:
        mantissa += ".0"
    return mantissa + e + exponent


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}
