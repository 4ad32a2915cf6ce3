"""Registry, closed-form checks for (momentum) SGD, and table-driven checks over OPTIMIZERS."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from cadence.optim import (
    OPTIMIZERS,
    ChainedOptimizer,
    build_optimizer,
    is_schedule_free,
    set_train_mode,
)

# LR (and extras) per optimizer for the small regression problem below.
SETTINGS: dict[str, dict] = {
    "gd": {"lr": 0.05},
    "sgd": {"lr": 0.02, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
    "adam": {"lr": 1e-2},
    "adamw": {"lr": 1e-2, "weight_decay": 0.01},
    "nadam": {"lr": 1e-2},
    "radam": {"lr": 1e-2},
    "adafactor": {"lr": 5e-2},
    "muon": {"lr": 1e-2, "weight_decay": 0.01},
    "lion": {"lr": 2e-3, "betas": (0.9, 0.99), "weight_decay": 0.1},
    "schedulefree-adamw": {"lr": 1e-2},
    "schedulefree-sgd": {"lr": 0.1},
    # from packages; the learning-rate-free ones at lr 1.0 (a multiplier of their estimate)
    "prodigy": {"lr": 1.0, "weight_decay": 0.01},
    "dadapt-adam": {"lr": 1.0, "weight_decay": 0.01},
    "soap": {"lr": 1e-2, "betas": (0.95, 0.95), "weight_decay": 0.01},
    "psgd-kron": {"lr": 3e-3, "momentum": 0.9, "weight_decay": 0.01},
    "ademamix": {"lr": 1e-2, "weight_decay": 0.01},
    "mars": {"lr": 1e-2, "weight_decay": 0.01},
}


def test_settings_cover_registry() -> None:
    assert set(SETTINGS) == set(OPTIMIZERS)


class RegressionMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.hidden = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 1)

    def output_parameter_names(self) -> set[str]:
        return {"out.weight", "out.bias"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = self.norm(h + torch.tanh(self.hidden(h)))
        return self.out(h)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3] - x[:, 3:4]
    return x, y


def _model(seed: int = 0) -> RegressionMLP:
    torch.manual_seed(seed)
    return RegressionMLP()


def _loss(model: nn.Module) -> torch.Tensor:
    x, y = _data()
    return nn.functional.mse_loss(model(x), y)


def _train(model: nn.Module, opt, steps: int) -> None:
    set_train_mode(opt, True)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------- closed forms


class Quadratic(nn.Module):
    def __init__(self, theta0: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta0.clone())


def _quadratic_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    m = torch.randn(4, 4, generator=g, dtype=torch.float64)
    a = m @ m.T + 4 * torch.eye(4, dtype=torch.float64)  # SPD
    b = torch.randn(4, generator=g, dtype=torch.float64)
    theta0 = torch.randn(4, generator=g, dtype=torch.float64)
    return a, b, theta0


def _quadratic_loss(model: Quadratic, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    t = model.theta
    return 0.5 * t @ a @ t - b @ t


@pytest.mark.parametrize("name", ["gd", "sgd"])
def test_plain_gd_matches_closed_form(name: str) -> None:
    a, b, theta0 = _quadratic_problem()
    alpha, steps = 0.05, 12
    model = Quadratic(theta0)
    opt = build_optimizer(name, model, lr=alpha)
    for _ in range(steps):
        opt.zero_grad()
        _quadratic_loss(model, a, b).backward()
        opt.step()
    # theta_k = theta* + (I - alpha A)^k (theta_0 - theta*), theta* = A^{-1} b
    star = torch.linalg.solve(a, b)
    contraction = torch.linalg.matrix_power(torch.eye(4, dtype=torch.float64) - alpha * a, steps)
    expected = star + contraction @ (theta0 - star)
    torch.testing.assert_close(model.theta.detach(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_heavy_ball_recurrence(nesterov: bool) -> None:
    a, b, theta0 = _quadratic_problem()
    alpha, mu, steps = 0.03, 0.9, 10
    model = Quadratic(theta0)
    opt = build_optimizer("sgd", model, lr=alpha, momentum=mu, nesterov=nesterov)
    theta, v = theta0.clone(), torch.zeros(4, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        _quadratic_loss(model, a, b).backward()
        opt.step()
        g = a @ theta - b
        v = mu * v + g
        theta = theta - alpha * (g + mu * v if nesterov else v)
    torch.testing.assert_close(model.theta.detach(), theta, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------- table-driven checks


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_reduces_loss(name: str) -> None:
    model = _model()
    opt = build_optimizer(name, model, **SETTINGS[name])
    with torch.no_grad():
        start = _loss(model).item()
    _train(model, opt, 50)
    set_train_mode(opt, False)  # schedule-free: judge the averaged weights
    with torch.no_grad():
        end = _loss(model).item()
    assert end < 0.5 * start, f"{name}: {start:.4f} -> {end:.4f}"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_is_bitwise(name: str) -> None:
    model = _model(0)
    opt = build_optimizer(name, model, **SETTINGS[name])
    _train(model, opt, 5)

    fresh = _model(1)  # different init: everything must come from the state dicts
    fresh.load_state_dict(copy.deepcopy(model.state_dict()))
    fresh_opt = build_optimizer(name, fresh, **SETTINGS[name])
    fresh_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert type(fresh_opt) is type(opt)

    # the same random streams for both continuations (PSGD-Kron draws probes and balancing)
    rng = torch.get_rng_state(), np.random.get_state()
    _train(model, opt, 5)
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    _train(fresh, fresh_opt, 5)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_group_has_base_lr_and_name(name: str) -> None:
    kw = dict(SETTINGS[name])
    if name == "muon":
        kw["aux_lr"] = 3e-3
    opt = build_optimizer(name, _model(), **kw)
    assert opt.param_groups
    for group in opt.param_groups:
        assert "base_lr" in group and "group_name" in group
        assert group["lr"] == group["base_lr"]
        expected = 3e-3 if group["group_name"].startswith("adamw_") else kw["lr"]
        assert group["base_lr"] == expected


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_group_lr_zero_freezes_params(name: str) -> None:
    # From a fresh optimizer every rule, schedule-free included, moves nothing at lr 0.
    model = _model()
    opt = build_optimizer(name, model, **SETTINGS[name])
    before = _params(model)
    for group in opt.param_groups:
        group["lr"] = 0.0
    _train(model, opt, 3)
    for p, q in zip(before, model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_group_lr_zero_after_training(name: str) -> None:
    model = _model()
    opt = build_optimizer(name, model, **SETTINGS[name])
    _train(model, opt, 3)
    for group in opt.param_groups:
        group["lr"] = 0.0
    if name == "dadapt-adam":
        # D-Adaptation folds d * lr into its momentum buffer and steps by the buffer, so at
        # lr 0 nothing new enters it and the step decays by beta1 each step instead of stopping.
        beta1 = opt.param_groups[0]["betas"][0]
        params = [p for g in opt.param_groups for p in g["params"]]
        avgs = [opt.state[p]["exp_avg"].clone() for p in params]
        _train(model, opt, 1)
        for avg, p in zip(avgs, params):
            torch.testing.assert_close(opt.state[p]["exp_avg"], beta1 * avg)
    elif is_schedule_free(opt):
        # Schedule-free's y keeps interpolating toward z after lr drops to 0 (the averaging
        # weight uses the largest lr seen); what lr=0 freezes is the z sequence.
        zs = [opt.state[p]["z"].clone() for p in model.parameters()]
        _train(model, opt, 3)
        for z, p in zip(zs, model.parameters()):
            assert torch.equal(z, opt.state[p]["z"])
    else:
        before = _params(model)
        _train(model, opt, 3)
        for p, q in zip(before, model.parameters()):
            assert torch.equal(p, q), name


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_group_lr_scales_the_update(name: str) -> None:
    deltas = []
    for scale in (1.0, 0.5):
        model = _model()
        opt = build_optimizer(name, model, **SETTINGS[name])
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
        before = _params(model)
        _train(model, opt, 2 if name == "soap" else 1)  # SOAP's first step only sets its basis
        deltas.append([q.detach() - p for p, q in zip(before, model.parameters())])
    moved = [d.abs().sum().item() for d in deltas[0]]
    assert sum(moved) > 0
    if name in ("gd", "sgd", "lion"):  # update is exactly proportional to lr on step 1
        for d1, d2 in zip(*deltas):
            torch.testing.assert_close(d2, 0.5 * d1, rtol=1e-5, atol=1e-7)
    else:
        assert any(not torch.equal(d1, d2) for d1, d2 in zip(*deltas))


# --------------------------------------------------------------------------- schedule-free


@pytest.mark.parametrize("name", [n for n, s in OPTIMIZERS.items() if s.schedule_free])
def test_schedule_free_train_eval_switch(name: str) -> None:
    model = _model()
    opt = build_optimizer(name, model, **SETTINGS[name])
    assert is_schedule_free(opt)
    _train(model, opt, 5)
    train_params = _params(model)
    set_train_mode(opt, False)
    eval_params = _params(model)
    assert any(not torch.equal(p, q) for p, q in zip(train_params, eval_params))
    set_train_mode(opt, False)  # idempotent
    assert all(torch.equal(p, q) for p, q in zip(eval_params, model.parameters()))
    set_train_mode(opt, True)
    for p, q in zip(train_params, model.parameters()):
        torch.testing.assert_close(q.detach(), p, rtol=1e-5, atol=1e-6)


def test_schedule_free_flags() -> None:
    for name, spec in OPTIMIZERS.items():
        opt = build_optimizer(name, _model(), **SETTINGS[name])
        assert is_schedule_free(opt) == spec.schedule_free, name
        assert spec.full_batch == (name == "gd")
        set_train_mode(opt, False)  # no-op (and no error) for the others
        set_train_mode(opt, True)


def test_set_train_mode_reaches_inside_chained() -> None:
    import schedulefree

    model = _model()
    sf = schedulefree.SGDScheduleFree([model.out.weight], lr=0.1)
    chained = ChainedOptimizer([torch.optim.SGD([model.inp.weight], lr=0.1), sf])
    assert is_schedule_free(chained)
    set_train_mode(chained, True)
    assert sf.param_groups[0]["train_mode"] is True
    set_train_mode(chained, False)
    assert sf.param_groups[0]["train_mode"] is False


# ------------------------------------------------------------------ chained optimizer + errors


def test_chained_optimizer_shares_group_dicts_and_state() -> None:
    model = _model()
    opt = build_optimizer("muon", model, lr=1e-2)
    assert isinstance(opt, ChainedOptimizer)
    inner_groups = [g for o in opt.optimizers for g in o.param_groups]
    assert all(a is b for a, b in zip(opt.param_groups, inner_groups))
    opt.param_groups[0]["lr"] = 0.123
    assert opt.optimizers[0].param_groups[0]["lr"] == 0.123
    _train(model, opt, 1)
    assert len(opt.state) == len(list(model.parameters()))
    assert all(p in opt.state for p in model.parameters())
    with pytest.raises(TypeError):
        opt.state[model.inp.weight] = {}  # read-only view
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    loss = opt.step(lambda: _loss(model).backward() or torch.tensor(1.0))
    assert loss.item() == 1.0


def test_chained_load_state_dict_count_mismatch() -> None:
    opt = build_optimizer("muon", _model(), lr=1e-2)
    sd = opt.state_dict()
    sd["optimizers"] = sd["optimizers"][:1]
    with pytest.raises(ValueError, match="1 optimizer states"):
        opt.load_state_dict(sd)


def test_chained_rejects_shared_params() -> None:
    p = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="more than one"):
        ChainedOptimizer([torch.optim.SGD([p], lr=1.0), torch.optim.AdamW([p])])


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("nope", {"lr": 1.0}, r"optimizer.name: unknown optimizer 'nope'; choose one of: gd, sgd"),
        ("sgd", {"lr": 0.0}, "optimizer.lr"),
        ("adamw", {"lr": -1e-3}, "optimizer.lr"),
        ("sgd", {"lr": 0.1, "nesterov": True}, "optimizer.nesterov"),
        ("gd", {"lr": 0.1, "momentum": 0.9}, "optimizer.momentum"),
        ("muon", {"lr": 0.1, "aux_lr": 0.0}, "optimizer.aux_lr"),
        ("sgd", {"lr": 0.1, "momentum": -0.5}, "optimizer.momentum"),
    ],
)
def test_build_errors(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_optimizer(name, _model(), **kwargs)


def test_momentum_defaults() -> None:
    muon = build_optimizer("muon", _model(), lr=1e-2)
    assert muon.optimizers[0].param_groups[0]["momentum"] == 0.95
    muon = build_optimizer("muon", _model(), lr=1e-2, momentum=0.8)
    assert muon.optimizers[0].param_groups[0]["momentum"] == 0.8
    sf = build_optimizer("schedulefree-sgd", _model(), lr=1e-2)
    assert sf.param_groups[0]["momentum"] == 0.9
    lion = build_optimizer("lion", _model(), lr=1e-4, betas=(0.95, 0.98))
    assert lion.param_groups[0]["betas"] == (0.95, 0.98)


def test_no_weight_decay_on_norms_and_biases() -> None:
    model = _model()
    for name in OPTIMIZERS:
        opt = build_optimizer(name, model, **{**SETTINGS[name], "weight_decay": 0.1})
        for group in opt.param_groups:
            if any(p.ndim < 2 for p in group["params"]):
                assert group["weight_decay"] == 0.0, (name, group["group_name"])
            else:
                assert group["weight_decay"] == 0.1, (name, group["group_name"])
