"""optimizer.fused: which optimizers get torch's fused kernel, and that it computes torch's
own update (the per-tensor loop is the reference, to rounding)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cadence.config import ConfigError, parse_config
from cadence.optim import OPTIMIZERS, build_optimizer
from cadence.optim.registry import inner_optimizers

FUSED = [n for n, s in OPTIMIZERS.items() if s.fused]
KW = {"lr": 1e-2, "weight_decay": 0.01}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 16))


def _kw(name: str) -> dict:
    return {**KW, "momentum": 0.9 if name in ("sgd", "muon") else 0.0}


def _torch_kernels(optimizer) -> list[torch.optim.Optimizer]:
    """The inner optimizers torch has a fused kernel for (Muon's own half has none)."""
    kinds = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
    return [o for o in inner_optimizers(optimizer) if isinstance(o, kinds)]


def test_the_table_says_which_have_a_kernel() -> None:
    assert set(FUSED) == {"gd", "sgd", "adam", "adamw", "muon"}


@pytest.mark.parametrize("name", FUSED)
def test_default_is_fused_on_cpu_and_false_keeps_the_loop(name: str) -> None:
    default = build_optimizer(name, _model(), **_kw(name))
    loop = build_optimizer(name, _model(), **_kw(name), fused=False)
    assert _torch_kernels(default) and _torch_kernels(loop)
    for opt in _torch_kernels(default):
        assert all(g["fused"] for g in opt.param_groups)
    for opt in _torch_kernels(loop):
        assert not any(g["fused"] for g in opt.param_groups)


@pytest.mark.parametrize("name", FUSED)
def test_fused_follows_the_loop(name: str) -> None:
    """30 steps on the same gradients: the fused kernel and torch's loop agree to rounding."""
    models = [_model(), _model()]
    opts = [
        build_optimizer(name, models[0], **_kw(name)),
        build_optimizer(name, models[1], **_kw(name), fused=False),
    ]
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        x = torch.randn(8, 4, generator=g)
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, torch.zeros_like(a))


def test_fused_state_resumes_bitwise() -> None:
    """A fused AdamW's state_dict (step on the parameter's device) loads into a fresh one and
    the next steps are identical: what exact resume needs."""
    model, twin = _model(), _model()
    opt = build_optimizer("adamw", model, **KW)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    twin.load_state_dict(model.state_dict())
    other = build_optimizer("adamw", twin, **KW)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read back from a file
    for m, o in ((model, opt), (twin, other)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n not in FUSED])
def test_requiring_a_kernel_torch_lacks_is_refused(name: str) -> None:
    lr = 1.0 if OPTIMIZERS[name].lr_free else 1e-3  # a multiplier of their own estimate
    with pytest.raises(
        ValueError, match=rf"optimizer.fused: torch has no fused kernel for '{name}'"
    ):
        build_optimizer(name, _model(), lr=lr, fused=True)
    build_optimizer(name, _model(), lr=lr)  # null: simply the loop


def test_integer_parameters_refuse_a_required_kernel() -> None:
    model = _model()
    model.register_parameter("count", nn.Parameter(torch.zeros(2, dtype=torch.int64), False))
    model.count.requires_grad_(False)
    opt = build_optimizer("adamw", model, lr=1e-3, fused=True)  # frozen ones are not optimised
    assert all(g["fused"] for g in opt.param_groups)


def test_config_checks_the_key_before_building() -> None:
    with pytest.raises(ConfigError, match="optimizer.fused: torch has no fused kernel for 'lion'"):
        parse_config(None, ["optimizer.name=lion", "optimizer.fused=true"])
    assert parse_config(None, ["optimizer.fused=false"]).optimizer.fused is False
    assert parse_config(None).optimizer.fused is None
