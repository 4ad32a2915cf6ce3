"""The gradient noise scale against per-example gradients computed exactly."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import cadence
from cadence.training import Trainer, fit
from cadence.tune.noise_scale import (
    NoiseScaleEstimator,
    NoiseScaleMonitor,
    estimate_noise_scale,
    lr_for_batch,
    measure_grad_norms,
    unbiased_estimates,
)
from cadence.workloads import TensorWorkload, Workload, build_workload


class LinearRegression(TensorWorkload):
    def loss_sum(self, model, batch):
        x, y = batch
        return 0.5 * ((model(x).squeeze(-1) - y) ** 2).sum()

    def evaluate(self, model):
        return {}


def regression(n: int = 4096, d: int = 10) -> tuple[Workload, float]:
    """A workload and its exact B_simple = tr(Sigma) / |G|^2 from per-example gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(0.7 * w + 0.3 * torch.randn(d, generator=g, dtype=torch.float64))
    per_example = (x @ model.weight[0].detach() - y)[:, None] * x  # g_i = (x_i.w - y_i) x_i
    mean = per_example.mean(0)
    trace = ((per_example - mean) ** 2).sum(1).mean()  # sampling with replacement: population cov
    return LinearRegression(model, x, y, x[:8], y[:8], None), float(trace / (mean @ mean))


def test_unbiased_estimators_invert_the_expectation_exactly():
    g2, trace = 2.5, 40.0
    for small, big in [(4, 64), (1, 2), (16, 48)]:
        e_small, e_big = g2 + trace / small, g2 + trace / big
        assert unbiased_estimates(e_small, e_big, small, big) == pytest.approx((g2, trace))


def test_matches_per_example_gradients_on_linear_regression():
    workload, exact = regression()
    cfg = cadence.load_config("sgd-logreg", ["batch.size=32", "train.progress=false"])
    est = estimate_noise_scale(cfg, workload, b_small=4, b_big=64, measurements=150, seed=0)
    # 150 pairs of 16 small batches: the estimate's spread is a few percent; allow 12%.
    assert est.b_simple == pytest.approx(exact, rel=0.12)
    assert est.samples == 150 * 64
    assert est.critical_batch == round(est.b_simple)


def test_measure_grad_norms_matches_explicit_gradients():
    workload, _ = regression(n=256)
    model = workload.model
    batches = [workload.batch(torch.arange(i * 8, i * 8 + 8)) for i in range(4)]
    small, big = measure_grad_norms(model, workload.loss_sum, batches, [8] * 4)
    assert all(p.grad is None for p in model.parameters())
    grads = []
    for b in batches:
        model.zero_grad()
        (workload.loss_sum(model, b) / 8).backward()
        grads.append(model.weight.grad.detach().clone().reshape(-1))
    assert small == pytest.approx(float(sum(g @ g for g in grads) / 4))
    mean = sum(grads) / 4
    assert big == pytest.approx(float(mean @ mean))


def test_ema_is_bias_corrected_and_averages_separately():
    est = NoiseScaleEstimator(beta=0.9)
    assert math.isnan(est.b_simple)
    for _ in range(3):
        est.update(2.5 + 40 / 4, 2.5 + 40 / 64, 4, 64)
    assert est.grad_sq == pytest.approx(2.5)
    assert est.trace == pytest.approx(40.0)
    assert est.b_simple == pytest.approx(16.0)
    restored = NoiseScaleEstimator()
    restored.load_state_dict(est.state_dict())
    assert restored.b_simple == est.b_simple


def test_lr_for_batch_follows_mccandlish():
    assert lr_for_batch(0.1, 64, 256, 64) == pytest.approx(0.1)
    eps_max = 0.1 * (1 + 256 / 64)
    assert lr_for_batch(0.1, 64, 256, 256) == pytest.approx(eps_max / 2)
    assert lr_for_batch(0.1, 64, math.nan, 256) == 0.1


def test_monitor_leaves_the_run_unchanged(tmp_path):
    cfg = cadence.load_config(
        "sgd-logreg",
        ["batch.size=32", "train.max_steps=30", "train.log_every=10", "train.progress=false"],
    )

    def run(callbacks, run_dir=None):
        w = build_workload(cfg)
        fit(Trainer(cfg, w, callbacks, run_dir=run_dir))
        return copy.deepcopy(w.model.state_dict())

    plain = run([])
    monitor = NoiseScaleMonitor(every=10, k=4)
    watched = run([monitor], run_dir=tmp_path)
    for k, v in plain.items():
        assert torch.equal(v, watched[k]), k
    assert [r["step"] for r in monitor.rows] == [10, 20, 30]
    # Early in training |G|^2 can be estimated <= 0 (B_simple = inf: the gradient is in the noise).
    assert all(not math.isnan(r["noise_scale"]) for r in monitor.rows)
    assert all(math.isfinite(r["grad_trace"]) for r in monitor.rows)
    lines = (tmp_path / "noise_scale.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30]


def test_bad_batches_are_refused():
    cfg = cadence.load_config("sgd-logreg", ["batch.size=32", "train.progress=false"])
    with pytest.raises(ValueError, match="multiple"):
        estimate_noise_scale(cfg, b_small=8, b_big=12)
