"""Lion: the foreach path, the for-loop path and a hand-written reference must agree."""

from __future__ import annotations

import copy

import pytest
import torch

import cadence.optim.lion as lion_mod
from cadence.optim import Lion

SHAPES_DTYPES = [
    ((3, 4), torch.float32),
    ((5,), torch.float32),
    ((2, 3, 4), torch.float64),
    ((7,), torch.float64),
    ((1,), torch.float32),
]


def _make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
        for shape, dtype in SHAPES_DTYPES
    ]


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [
        torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        for shape, dtype in SHAPES_DTYPES
    ]


def _reference(
    params: list[torch.Tensor],
    steps: int,
    lr: float,
    b1: float,
    b2: float,
    wd: float,
    maximize: bool = False,
) -> list[torch.Tensor]:
    """Lion written straight from the paper with plain tensor arithmetic."""
    ps = [p.detach().clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    for k in range(steps):
        for i, g in enumerate(_grads(k)):
            if maximize:
                g = -g
            c = b1 * ms[i] + (1 - b1) * g
            ps[i] = ps[i] * (1 - lr * wd) - lr * torch.sign(c)
            ms[i] = b2 * ms[i] + (1 - b2) * g
    return ps


def _run(foreach: bool | None, steps: int, maximize: bool = False, **kw) -> tuple[list, Lion]:
    params = _make_params()
    opt = Lion(params, foreach=foreach, maximize=maximize, **kw)
    for k in range(steps):
        for p, g in zip(params, _grads(k)):
            p.grad = g
        opt.step()
    return params, opt


@pytest.mark.parametrize("maximize", [False, True])
def test_foreach_matches_for_loop_and_reference(maximize: bool) -> None:
    kw = {"lr": 3e-3, "betas": (0.9, 0.99), "weight_decay": 0.1}
    steps = 6
    loop, _ = _run(False, steps, maximize, **kw)
    multi, opt = _run(True, steps, maximize, **kw)
    ref = _reference(_make_params(), steps, 3e-3, 0.9, 0.99, 0.1, maximize)
    for a, b, r in zip(loop, multi, ref):
        assert a.dtype == b.dtype == r.dtype
        tol = 1e-6 if a.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=tol)
        torch.testing.assert_close(a.detach(), r, rtol=0, atol=tol)
    for p in multi:
        assert set(opt.state[p]) == {"exp_avg"}


def test_default_foreach_on_cpu_uses_for_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("foreach path chosen for CPU tensors")

    monkeypatch.setattr(lion_mod, "_multi_tensor_lion", boom)
    _run(None, 1, lr=1e-3)


def test_foreach_true_uses_multi_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = lion_mod._multi_tensor_lion
    monkeypatch.setattr(
        lion_mod, "_multi_tensor_lion", lambda *a, **k: (calls.append(1), real(*a, **k))
    )
    _run(True, 2, lr=1e-3)
    assert len(calls) == 2


def test_each_coordinate_moves_by_lr() -> None:
    p = torch.nn.Parameter(torch.zeros(10))
    opt = Lion([p], lr=0.01)
    p.grad = torch.linspace(-1, 1, 10) + 0.05  # no exact zeros
    opt.step()
    torch.testing.assert_close(p.detach().abs(), torch.full((10,), 0.01))


def test_params_without_grad_are_skipped_and_closure_returns_loss() -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = Lion([a, b], lr=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (a**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(3.0)
    assert torch.equal(b.detach(), torch.ones(3))
    assert b not in opt.state
    assert torch.all(a.detach() < 1)


def test_state_dict_round_trip() -> None:
    params, opt = _run(False, 3, lr=1e-3, weight_decay=0.1)
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Lion(clone, lr=1e-3, weight_decay=0.1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for k in range(3, 6):
        for ps in (params, clone):
            for p, g in zip(ps, _grads(k)):
                p.grad = g
        opt.step()
        opt2.step()
    for a, b in zip(params, clone):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"betas": (1.0, 0.99)}, "Invalid beta parameter at index 0"),
        ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1"),
        ({"weight_decay": -0.1}, "Invalid weight_decay"),
    ],
)
def test_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Lion([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_sparse_grad_rejected() -> None:
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([0, 1])).sum().backward()
    opt = Lion(emb.parameters(), lr=1e-3)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
