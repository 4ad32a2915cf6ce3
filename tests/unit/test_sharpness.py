"""Sharpness against Hessians known in closed form, and thresholds against real divergence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cadence.training.sharpness import (
    HessianVectorProduct,
    adam_preconditioner,
    hessian_vector_product,
    measure,
    stability_threshold,
    top_eigenvalue,
)

EIGS = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.25, 0.1], dtype=torch.float64)


def spd(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigs) Q^T`` for a random orthogonal ``Q``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return q @ torch.diag(eigs) @ q.T


def quadratic(a: torch.Tensor, *params: torch.Tensor):
    """``0.5 x^T A x`` over the concatenation of ``params``."""

    def loss() -> torch.Tensor:
        x = torch.cat([p.reshape(-1) for p in params])
        return 0.5 * x @ a @ x

    return loss


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_quadratic_top_eigenvalue():
    a = spd(EIGS)
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    got = top_eigenvalue(quadratic(a, x), [x], iters=200, tol=1e-10)
    assert rel(got, float(EIGS.max())) < 1e-3


def test_quadratic_split_over_two_tensors():
    x1 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    full = torch.cat([EIGS, torch.tensor([2.0, 4.0, 0.3], dtype=torch.float64)])
    a = spd(full, seed=1)
    got = top_eigenvalue(quadratic(a, x1, x2), [x1, x2], iters=200, tol=1e-10)
    assert rel(got, float(full.max())) < 1e-3


def test_hvp_matches_matrix_product():
    a = spd(EIGS)
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, dtype=torch.float64)
    (hv,) = hessian_vector_product(quadratic(a, x)(), [x], [v])
    assert torch.allclose(hv, a @ v)
    hvp = HessianVectorProduct(quadratic(a, x)(), [x])  # reusable: the graph is retained
    assert torch.equal(hvp([v])[0], hvp([v])[0])


def test_the_top_eigenvalue_is_found_past_a_larger_negative_one():
    """Power iteration alone finds -4 here (the largest magnitude); the shifted second run
    finds the largest eigenvalue, 2. With every eigenvalue negative, it is the least negative."""
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for eigs, top in (([-4.0, 1.0, 2.0], 2.0), ([-4.0, -2.0, -1.0], -1.0)):
        a = spd(torch.tensor(eigs, dtype=torch.float64))
        got = top_eigenvalue(quadratic(a, x), [x], iters=500, tol=1e-12)
        assert rel(got, top) < 1e-3


def test_logistic_regression_closed_form_hessian():
    g = torch.Generator().manual_seed(0)
    n, d = 64, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < 0.5).to(torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64).requires_grad_()

    def loss() -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(x @ w, y)

    p = torch.sigmoid(x @ w.detach())
    h = x.T @ torch.diag(p * (1 - p)) @ x / n
    got = top_eigenvalue(loss, [w], iters=100, tol=1e-10)
    assert rel(got, float(torch.linalg.eigvalsh(h).max())) < 1e-3


def test_preconditioned_quadratic():
    a = spd(EIGS, seed=2)
    d = torch.tensor([0.5, 2.0, 1.0, 4.0, 0.25, 3.0], dtype=torch.float64)
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    s = torch.diag(d.rsqrt())
    want = float(torch.linalg.eigvalsh(s @ a @ s).max())
    got = top_eigenvalue(quadratic(a, x), [x], iters=300, tol=1e-12, preconditioner=[d])
    assert rel(got, want) < 1e-3
    with pytest.raises(ValueError, match="positive"):
        top_eigenvalue(quadratic(a, x), [x], preconditioner=[torch.zeros_like(d)])


def test_probe_leaves_grads_weights_and_rng_alone():
    torch.manual_seed(123)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 1))
    xb, yb = torch.randn(16, 4), torch.randn(16, 1)
    model.zero_grad(set_to_none=False)
    nn.functional.mse_loss(model(xb), yb).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    state = torch.get_rng_state()

    def loss() -> torch.Tensor:
        return nn.functional.mse_loss(model(xb), yb)  # dropout draws from the global stream

    first = top_eigenvalue(loss, list(model.parameters()))
    assert torch.equal(torch.get_rng_state(), state)
    for p, g, w in zip(model.parameters(), grads, weights):
        assert torch.equal(p.grad, g) and torch.equal(p.detach(), w)
    torch.set_rng_state(state)
    assert top_eigenvalue(loss, list(model.parameters())) == first
    model.eval()  # without dropout the start vector is all that is random: not the global one
    torch.manual_seed(1)
    at_one = top_eigenvalue(loss, list(model.parameters()))
    torch.manual_seed(2)
    assert top_eigenvalue(loss, list(model.parameters())) == at_one


def test_float32_params_give_a_float():
    x = torch.randn(6, requires_grad=True)
    got = top_eigenvalue(quadratic(spd(EIGS).float(), x), [x], iters=200, tol=1e-8)
    assert isinstance(got, float) and rel(got, 5.0) < 1e-3


def diverges(make_opt, curvature: float, steps: int = 300) -> bool:
    """Run the optimizer on ``0.5 * curvature * x^2`` and say whether ``x`` blew up."""
    x = torch.ones(1, dtype=torch.float64, requires_grad=True)
    opt = make_opt([x])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * curvature * x.pow(2).sum()).backward()
        opt.step()
    return abs(float(x.detach())) > 1.0


@pytest.mark.parametrize(
    ("kwargs", "want"),
    [
        ({"lr": 0.1}, 2 / 0.1),
        ({"lr": 0.1, "momentum": 0.9}, (2 + 1.8) / 0.1),
        ({"lr": 0.1, "momentum": 0.9, "nesterov": True}, (2 + 1.8) / ((1 + 1.8) * 0.1)),
        ({"lr": 0.1, "momentum": 0.9, "dampening": 0.5}, (2 + 1.8) / (0.5 * 0.1)),
    ],
)
def test_sgd_thresholds_are_where_sgd_diverges(kwargs, want):
    threshold, which = stability_threshold(torch.optim.SGD([torch.zeros(1)], **kwargs))
    assert which == "sharpness" and threshold == pytest.approx(want)

    def make(params):
        return torch.optim.SGD(params, **kwargs)

    assert not diverges(make, 0.9 * threshold)
    assert diverges(make, 1.1 * threshold)


def test_adam_threshold_is_preconditioned():
    opt = torch.optim.AdamW([torch.zeros(1)], lr=1e-3, betas=(0.9, 0.999))
    threshold, which = stability_threshold(opt)
    assert which == "preconditioned" and threshold == pytest.approx(38.0 / 1e-3)
    # With P frozen, Adam is SGD whose momentum buffer is an EMA: dampening 1 - beta1.
    sgd = torch.optim.SGD([torch.zeros(1)], lr=1e-3, momentum=0.9, dampening=0.9)
    assert stability_threshold(sgd)[0] == pytest.approx(threshold)


def test_unknown_or_zero_lr_has_no_threshold():
    assert stability_threshold(torch.optim.Adagrad([torch.zeros(1)], lr=0.1)) is None
    assert stability_threshold(torch.optim.SGD([torch.zeros(1)], lr=0.0)) is None

    class Wrapped(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.5, "momentum": 0.0})

    Wrapped.__name__ = "SGD"
    assert stability_threshold(Wrapped([torch.zeros(1)])) == (4.0, "sharpness")


def test_adam_preconditioner_matches_state():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, generator=g, dtype=torch.float64).requires_grad_()
    opt = torch.optim.AdamW([w], lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    assert adam_preconditioner(opt, [w]) is None
    target = torch.randn(3, 2, generator=g, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        ((w - target) ** 4).sum().backward()
        opt.step()
    (d,) = adam_preconditioner(opt, [w])
    state = opt.state[w]
    t = float(state["step"])
    v_hat = state["exp_avg_sq"] / (1 - 0.95**t)
    assert torch.allclose(d, (1 - 0.8**t) * (v_hat.sqrt() + 1e-6))


def tiny_model_and_loss():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    xb, yb = torch.randn(8, 3), torch.randn(8, 2)

    def loss() -> torch.Tensor:
        return nn.functional.mse_loss(model(xb), yb)

    return model, loss


def test_measure_with_adamw():
    model, loss = tiny_model_and_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert set(measure(loss, list(model.parameters()), opt)) == {"sharpness", "sharpness_threshold"}
    loss().backward()
    opt.step()
    row = measure(loss, list(model.parameters()), opt)
    assert set(row) == {"sharpness", "precond_sharpness", "sharpness_threshold"}
    assert all(isinstance(v, float) for v in row.values())
    assert row["sharpness_threshold"] == pytest.approx(38_000.0)
    assert row["precond_sharpness"] > row["sharpness"]  # P < 1 after one step of small grads


def test_measure_with_sgd_and_unknown():
    model, loss = tiny_model_and_loss()
    params = list(model.parameters())
    row = measure(loss, params, torch.optim.SGD(params, lr=0.1))
    assert set(row) == {"sharpness", "sharpness_threshold"}
    assert row["sharpness_threshold"] == pytest.approx(20.0)
    assert set(measure(loss, params, torch.optim.Adagrad(params, lr=0.1))) == {"sharpness"}
