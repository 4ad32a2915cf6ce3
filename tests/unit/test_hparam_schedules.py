"""Momentum and weight-decay schedules: the closed form of the points, the groups they reach,
and torch's SGD driven by them against a hand-written heavy-ball loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cadence.optim import OPTIMIZERS, build_optimizer
from cadence.schedules import join, warmup
from cadence.schedules.hparams import (
    HyperSchedules,
    PiecewiseLinear,
    piecewise_linear,
    set_momentum,
    set_weight_decay,
)


def test_points_are_linear_between_and_flat_outside_as_np_interp() -> None:
    # modded-nanogpt's shape: warm up over 300 steps, hold, cool down over the last 10%
    total = 1000
    sched = piecewise_linear(
        [[0, 0.85], [300, 0.95], [0.9, 0.95], [1.0, 0.85]], total, "k", low=0.0, high=1.0
    )
    assert sched.steps == (0, 300, 900, 1000)  # fractions of the run, as the LR schedules count
    t = np.arange(0, total + 50)
    expected = np.interp(t, [0, 300, 900, 1000], [0.85, 0.95, 0.95, 0.85])
    np.testing.assert_allclose([sched(int(i)) for i in t], expected, rtol=0, atol=1e-15)


def test_a_single_point_is_constant_and_two_at_one_step_make_a_jump() -> None:
    assert {piecewise_linear([[5, 0.3]], 10, "k", low=0, high=1)(t) for t in range(20)} == {0.3}
    jump = PiecewiseLinear((0, 4, 4, 8), (1.0, 1.0, 0.5, 0.5))
    assert [jump(t) for t in range(8)] == [1.0] * 4 + [0.5] * 4


def test_fractions_round_to_the_nearest_step_of_the_run() -> None:
    for total in (7, 20, 300, 1001):
        for f in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
            (step,) = piecewise_linear([[f, 0.5]], total, "k", low=0, high=1).steps
            assert step == round(f * total)


def test_they_compose_like_lr_schedules() -> None:
    flat = piecewise_linear([[0, 0.9]], 100, "k", low=0, high=1)
    ramp = warmup(flat, 10)
    assert ramp(0) == pytest.approx(0.1) and ramp(9) == pytest.approx(1.0) and ramp(50) == 0.9
    pieces = join([flat, piecewise_linear([[0, 0.5], [10, 0.7]], 100, "k", low=0, high=1)], [20])
    assert pieces(19) == 0.9 and pieces(20) == 0.5 and pieces(25) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ([], "expected points"),
        ("0.9", "expected points"),
        ([[0, 0.9, 1]], "point 0 must be [position, value]"),
        ([[0, "a"]], "point 0: the value must be a number"),
        ([[0, 1.0]], "must be in [0, 1)"),
        ([[0, -0.1]], "must be in [0, 1)"),
        ([[-1, 0.5]], "a step position must be >= 0"),
        ([[1.5, 0.5]], "a fraction of the run must be in [0, 1]"),
        ([[True, 0.5]], "a position must be a step"),
        ([[10, 0.5], [5, 0.6]], "positions must not decrease"),
        ([[0.5, 0.5], [10, 0.6]], "positions must not decrease"),  # 0.5 of 100 = step 50 > 10
    ],
)
def test_bad_points_name_the_key_and_the_fix(points: object, message: str) -> None:
    with pytest.raises(ValueError, match=r"^schedule\.momentum: ") as err:
        piecewise_linear(points, 100, "schedule.momentum", low=0, high=1, high_open=True)  # type: ignore[arg-type]
    assert message in str(err.value)


class _Net(nn.Module):
    """A hidden matrix (Muon's), a head and a norm: every kind of group the registry makes."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.hidden(x))))


@pytest.mark.parametrize("name", [n for n, s in OPTIMIZERS.items() if s.momentum_key])
def test_momentum_reaches_the_groups_that_have_it(name: str) -> None:
    key = OPTIMIZERS[name].momentum_key
    lr = 1.0 if OPTIMIZERS[name].lr_free else 0.01
    opt = build_optimizer(name, _Net(), lr=lr, weight_decay=0.1, momentum=0.5)
    assert key is not None
    assert set_momentum(opt, 0.77, key) > 0
    for g in opt.param_groups:
        if key == "momentum" and "momentum" in g:
            assert g["momentum"] == 0.77
        elif key == "betas" and "betas" in g:
            assert g["betas"][0] == 0.77
    if name == "muon":  # its AdamW half keeps its own beta1
        assert {g["betas"][0] for g in opt.param_groups if "betas" in g} == {0.9}


def test_weight_decay_scales_each_groups_own_base_and_keeps_exemptions_at_zero() -> None:
    opt = build_optimizer("adamw", _Net(), lr=0.01, weight_decay=0.2)
    before = [g["weight_decay"] for g in opt.param_groups]
    assert 0.0 in before and 0.2 in before  # norms and biases are exempt
    for factor in (0.5, 0.25, 1.0):  # from the base each time, not compounded
        set_weight_decay(opt, factor)
        assert [g["weight_decay"] for g in opt.param_groups] == [w * factor for w in before]
    # the base travels with the optimizer's state, so a resumed run scales the same base
    state = opt.state_dict()["param_groups"]
    assert [g["base_weight_decay"] for g in state] == before


def test_torch_sgd_under_the_schedules_is_heavy_ball_with_varying_momentum_and_decay() -> None:
    """v <- mu_t v + (g + wd_t p); p <- p - lr_t v, written out as a plain loop."""
    torch.manual_seed(0)
    a = torch.randn(8, 4, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    steps, lr0, wd0 = 30, 0.05, 0.1
    scheds = HyperSchedules(
        momentum=piecewise_linear([[0, 0.5], [10, 0.9], [1.0, 0.6]], steps, "k", low=0, high=1),
        momentum_key="momentum",
        weight_decay="lr",
        base_weight_decay=wd0,
    )

    def lr_mult(t: int) -> float:
        return 1.0 - 0.5 * t / steps

    def grad(x: torch.Tensor) -> torch.Tensor:
        return a.T @ (a @ x - b) / len(b)

    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr0, momentum=0.0, weight_decay=wd0, foreach=False)
    opt.param_groups[0]["base_lr"] = lr0
    logged = []
    for t in range(steps):
        opt.param_groups[0]["lr"] = lr0 * lr_mult(t)
        logged.append(scheds.apply(opt, t, lr_mult(t)))
        p.grad = grad(p.detach())
        opt.step()

    x, v = torch.zeros(4, dtype=torch.float64), None
    mus = np.interp(np.arange(steps), [0, 10, steps], [0.5, 0.9, 0.6])
    for t in range(steps):
        d = grad(x) + wd0 * lr_mult(t) * x
        v = d.clone() if v is None else mus[t] * v + d  # torch's first step: v = d
        x = x - lr0 * lr_mult(t) * v
    torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose([r["momentum"] for r in logged], mus, atol=1e-15)
    np.testing.assert_allclose(
        [r["weight_decay"] for r in logged], [wd0 * lr_mult(t) for t in range(steps)]
    )
