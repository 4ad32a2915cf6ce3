"""The LR range test against ground truth: 2/L on quadratics and logistic regression."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import cadence
from cadence.optim import OPTIMIZERS
from cadence.tune.lr_finder import ema_lag, lr_range_test, smooth_losses, suggest_from_curve
from cadence.workloads import TensorWorkload, Workload, build_workload


class LeastSquares(TensorWorkload):
    """0.5 |Xw - y|^2 / n: Hessian X^T X / n, known exactly."""

    def loss_sum(self, model, batch):
        x, y = batch
        return 0.5 * ((model(x).squeeze(-1) - y) ** 2).sum()

    def evaluate(self, model):
        return {"val_loss": float(self.loss_sum(model, (self.x_val, self.y_val)) / len(self.x_val))}


def least_squares(n: int = 512, d: int = 20, cond: float = 100.0) -> tuple[Workload, float]:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / n)).T  # exactly white
    eig = torch.logspace(0, math.log10(cond), d, dtype=torch.float64)
    x = z @ torch.diag(eig.sqrt()) @ q.T  # Hessian X^T X / n = q diag(eig) q^T
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        n, generator=g, dtype=torch.float64
    )
    model = nn.Linear(d, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    top = float(torch.linalg.eigvalsh(x.T @ x / n).max())
    assert top == pytest.approx(cond, rel=1e-9)
    return LeastSquares(model, x, y, x[:64], y[:64], None), top


def gd_config(name: str = "gd-logreg"):
    return cadence.load_config(name, ["train.progress=false"])


# ---------------------------------------------------------------- pure curve analysis


def test_slope_is_taken_against_log_lr():
    # Loss falls fastest per decade at lr = 1e-2, over a few decades. Against lr itself
    # (Lightning's bug) the slope is divided by lr and the steepest point runs off to the
    # start of the range, where nothing is happening yet.
    lrs = np.exp(np.linspace(math.log(1e-6), math.log(1.0), 120))
    loss = 2.0 - np.tanh((np.log(lrs) - math.log(1e-2)) / 3)
    lr, _ = suggest_from_curve(lrs, loss)
    assert lr == pytest.approx(1e-2, rel=0.15)
    against_lr = lrs[int(np.argmin(np.gradient(loss, lrs)))]
    assert against_lr < lr / 100


def test_early_spike_is_not_mistaken_for_progress():
    lrs = np.exp(np.linspace(math.log(1e-6), math.log(1.0), 120))
    loss = 2.0 - np.tanh(np.log(lrs) - math.log(1e-2))
    loss[6:9] = [8.0, 12.0, 6.0]  # the steep recovery after this lies above the starting level
    lr, _ = suggest_from_curve(lrs, loss)
    assert lr == pytest.approx(1e-2, rel=0.15)


def test_bias_corrected_ema_and_its_lag():
    assert smooth_losses([3.0] * 5, 0.9) == pytest.approx([3.0] * 5)
    assert smooth_losses([math.e**2] * 4, 0.9, log=True) == pytest.approx([math.e**2] * 4)
    # A linear trend seen through the EMA is the trend `ema_lag` steps earlier.
    beta, t = 0.8, 30
    ys = smooth_losses([float(k) for k in range(t + 1)], beta)
    assert ys[-1] == pytest.approx(t - ema_lag(t, beta), rel=1e-9)


# ---------------------------------------------------------------- ground truth: 2 / L


def test_least_squares_suggestion_below_and_divergence_above_2_over_L():
    workload, top = least_squares()
    edge = 2.0 / top
    result = lr_range_test(gd_config(), workload, min_lr=1e-4, max_lr=10.0, steps=100)
    assert edge / 10 < result.suggestion < edge  # about 1/L: the fastest stable step
    assert result.diverged_lr is not None
    assert edge <= result.diverged_lr <= 10 * edge


def _logreg_hessian_top(workload, weight: torch.Tensor, bias: torch.Tensor) -> float:
    model = workload.model
    with torch.no_grad():
        model.linear.weight.copy_(weight)
        model.linear.bias.copy_(bias)
    params = [model.linear.weight, model.linear.bias]

    def objective(w, b):
        logits = workload.x_train @ w.reshape(-1) + b
        data = nn.functional.binary_cross_entropy_with_logits(logits, workload.y_train)
        return data + 0.5 * workload.l2 * (w * w).sum()

    h = torch.autograd.functional.hessian(objective, tuple(p.detach() for p in params))
    d = params[0].numel()
    full = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    full[:d, :d] = h[0][0].reshape(d, d)
    full[:d, d:] = h[0][1].reshape(d, 1)
    full[d:, :d] = h[1][0].reshape(1, d)
    full[d:, d:] = h[1][1].reshape(1, 1)
    return float(torch.linalg.eigvalsh(full).max())


def test_logreg_from_init_suggestion_is_stable():
    cfg = gd_config()
    workload = build_workload(cfg)
    # The logistic loss is smooth with L = lambda_max(X^T X / n) / 4 + l2 everywhere (sigma' <=
    # 1/4), so below 2/L every GD step decreases the loss and the test cannot see a divergence.
    x = torch.cat([workload.x_train, torch.ones(len(workload.x_train), 1, dtype=torch.float64)], 1)
    top = float(torch.linalg.eigvalsh(x.T @ x / len(x)).max()) / 4 + workload.l2
    edge = 2.0 / top
    result = lr_range_test(cfg, workload, min_lr=1e-4, max_lr=100.0, steps=100)
    assert edge / 20 < result.suggestion < edge
    assert result.diverged_lr is None or result.diverged_lr > edge


def test_logreg_at_the_optimum_diverges_just_past_2_over_L():
    cfg = gd_config()
    workload = build_workload(cfg)
    model = workload.model
    # Newton's method to the optimum, then the exact curvature there.
    w = torch.zeros(1, 30, dtype=torch.float64)
    b = torch.zeros(1, dtype=torch.float64)
    for _ in range(30):
        theta = torch.cat([w.reshape(-1), b]).requires_grad_(True)
        logits = workload.x_train @ theta[:-1] + theta[-1]
        j = nn.functional.binary_cross_entropy_with_logits(logits, workload.y_train)
        j = j + 0.5 * workload.l2 * (theta[:-1] ** 2).sum()
        g = torch.autograd.grad(j, theta, create_graph=True)[0]
        h = torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(31)])
        step = torch.linalg.solve(h, g.detach())
        w, b = (theta.detach()[:-1] - step[:-1]).reshape(1, 30), theta.detach()[-1:] - step[-1:]
    top = _logreg_hessian_top(workload, w, b)
    edge = 2.0 / top
    # A fine ramp: at the optimum nothing happens until 2/L*, then the top direction grows.
    result = lr_range_test(cfg, workload, min_lr=edge / 10, max_lr=edge * 100, steps=200)
    assert result.diverged_lr is not None
    assert edge <= result.diverged_lr <= 10 * edge
    assert torch.equal(model.linear.weight.detach(), w)  # restored to where it started


# ---------------------------------------------------------------- every optimizer, restoration


@pytest.mark.parametrize("name", [n for n, s in OPTIMIZERS.items() if not s.lr_free])
def test_every_optimizer_gives_a_suggestion_and_restores_the_model(name):
    batch = "full" if name == "gd" else "64"
    cfg = cadence.load_config(
        "sgd-logreg", [f"optimizer.name={name}", f"batch.size={batch}", "train.progress=false"]
    )
    workload = build_workload(cfg)
    before = copy.deepcopy(workload.model.state_dict())
    result = lr_range_test(cfg, workload, min_lr=1e-5, max_lr=10.0, steps=40)
    assert 1e-5 <= result.suggestion <= 10.0
    assert math.isfinite(result.suggestion)
    for k, v in workload.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_given_optimizer_state_and_rng_are_restored():
    cfg = cadence.load_config(
        "sgd-logreg", ["optimizer.name=adamw", "batch.size=32", "train.progress=false"]
    )
    workload = build_workload(cfg)
    from cadence.config.parts import optimizer_from

    opt = optimizer_from(cfg, workload.model)
    loss = workload.loss_sum(workload.model, workload.batch(torch.arange(32))) / 32
    loss.backward()
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(workload.model.state_dict())
    rng = torch.get_rng_state()
    lr_range_test(cfg, workload, optimizer=opt, steps=30, seeds=[0, 1])
    assert torch.equal(torch.get_rng_state(), rng)
    after = opt.state_dict()
    for p, s in state["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(after["state"][p][k]), torch.as_tensor(v)), k
    assert [g["lr"] for g in after["param_groups"]] == [g["lr"] for g in state["param_groups"]]
    for k, v in workload.model.state_dict().items():
        assert torch.equal(v, weights[k])


def test_seeds_average_and_report_each():
    cfg = cadence.load_config("sgd-logreg", ["batch.size=16", "train.progress=false"])
    result = lr_range_test(cfg, steps=40, seeds=[0, 1, 2])
    assert len(result.per_seed_suggestions) == 3
    assert result.steps <= 120 and result.samples == result.steps * 16
    lo, hi = min(result.per_seed_suggestions), max(result.per_seed_suggestions)
    assert lo / 3 <= result.suggestion <= hi * 3


def test_bad_range_is_refused():
    with pytest.raises(ValueError, match="min_lr"):
        lr_range_test(gd_config(), min_lr=1.0, max_lr=0.1)
