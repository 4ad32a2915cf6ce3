"""When a run stops: a target metric, early stopping, a gradient-norm tolerance, budgets.

Each stop must land on the step that a formula, or the same run without the stop, predicts, and
name its reason in the summary; sample and token budgets stop at the first step that reaches them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from trainer_helpers import num, run_fit, smoothness, theta_of

from cadence.data import logreg_grad
from cadence.workloads import build_workload

# ---------------------------------------------------------------- stopping


def test_target_stops_the_run_or_is_only_recorded(make_config) -> None:
    common = [
        "optimizer.name=adamw",
        "optimizer.lr=0.003",
        "batch.size=32",
        "train.eval_every=5",
        "train.log_every=5",
        "train.target=0.5",
    ]
    summary, rows, _ = run_fit(make_config("mnist", *common, "train.max_steps=300"))
    hit = summary["target_step"]
    assert summary["stop_reason"] == "target"
    assert hit is not None and summary["steps"] == hit < 300
    accuracies = [r["val_accuracy"] for r in rows]
    assert accuracies[-1] >= 0.5 and all(a < 0.5 for a in accuracies[:-1])

    # Same seed, same trajectory: the target is recorded at the same step and training goes on.
    cfg = make_config("mnist", *common, f"train.max_steps={hit + 10}", "train.stop_at_target=false")
    summary, _, _ = run_fit(cfg)
    assert summary["target_step"] == hit
    assert summary["stop_reason"] == "max_steps"
    assert summary["steps"] == hit + 10


def test_early_stopping_counts_evaluations_without_improvement(make_config) -> None:
    patience, eval_every = 3, 2
    cfg = make_config(
        "digits",
        "optimizer.name=sgd",
        f"optimizer.lr={num(1e-12)}",  # far below float32 resolution: the weights never change
        "batch.size=32",
        "train.max_steps=100",
        f"train.eval_every={eval_every}",
        f"train.log_every={eval_every}",
        f"train.early_stop_patience={patience}",
    )
    summary, rows, _ = run_fit(cfg)
    assert summary["stop_reason"] == "early_stop"
    # The first evaluation sets the best; `patience` more without improvement stop the run.
    assert summary["steps"] == eval_every * (patience + 1)
    assert len({r["val_accuracy"] for r in rows}) == 1
    assert summary["best_step"] == eval_every


def test_gradient_norm_tolerance_stops_gd(make_config) -> None:
    probe = build_workload(make_config("logreg"))
    x, y = probe.x_train.double().numpy(), probe.y_train.double().numpy()
    tol = float(np.linalg.norm(logreg_grad(x, y, theta_of(probe), probe.l2))) / 10
    cfg = make_config(
        "logreg",
        "optimizer.name=gd",
        f"optimizer.lr={num(1 / smoothness(probe))}",
        "batch.size=full",
        "train.max_steps=5000",
        "train.log_every=1",
        "train.eval_every=5000",
        f"train.tol_grad_norm={num(tol)}",
    )
    summary, rows, _ = run_fit(cfg)
    assert summary["stop_reason"] == "converged_grad_norm"
    assert summary["steps"] == len(rows) < 5000
    assert rows[-1]["grad_norm"] < tol
    assert all(r["grad_norm"] >= tol for r in rows[:-1])


# ---------------------------------------------------------------- budgets


@pytest.mark.parametrize(("workload", "budget"), [("logreg", "max_samples"), ("lm", "max_tokens")])
def test_sample_and_token_budgets_stop_at_the_right_step(
    make_config, workload: str, budget: str
) -> None:
    batch, limit = 8, 100
    if budget == "max_tokens":
        limit = 300  # tokens: a few steps of 8 sequences
    cfg = make_config(
        workload, "optimizer.name=sgd", f"batch.size={batch}", f"train.{budget}={limit}"
    )
    w = build_workload(cfg)
    per_step = batch * (w.tokens_per_sample if budget == "max_tokens" else 1)
    summary, _, _ = run_fit(cfg, w)
    expected_steps = math.ceil(limit / per_step)
    assert summary["stop_reason"] == budget
    assert summary["steps"] == expected_steps
    assert summary["samples"] == expected_steps * batch
    if budget == "max_tokens":
        assert summary["tokens"] == expected_steps * per_step
