"""Muon's float32 Newton–Schulz on CPU: the closed form it approximates, and the step it takes.

Newton–Schulz's quintic iteration X <- aX + b(XX^T)X + c(XX^T)^2 X keeps the singular vectors of
its input and maps each singular value s (of the Frobenius-normalised matrix) through
p(s) = as + bs^3 + cs^5, ns_steps times. The reference is therefore U p^k(S / ||G||_F) V^T from an
SVD, in float64: independent of both implementations.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim._muon import _adjust_lr

from cadence.optim import build_optimizer
from cadence.optim.sharded import ShardedMuon, newton_schulz

COEFFS = (3.4445, -4.7750, 2.0315)  # torch's (Keller Jordan's) defaults
STEPS = 5


def _closed_form(g: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    x = s / s.norm()
    a, b, c = COEFFS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return u @ torch.diag(x) @ vh


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
def test_float32_iteration_is_the_singular_value_polynomial(shape: tuple[int, int]) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz(g, COEFFS, STEPS, 1e-7, torch.float32)
    assert ours.dtype == torch.float32 and ours.shape == g.shape
    torch.testing.assert_close(ours.double(), _closed_form(g), rtol=0, atol=2e-5)


def test_torchs_bfloat16_iteration_is_the_same_map_to_bf16_precision() -> None:
    g = torch.randn(12, 7, generator=torch.Generator().manual_seed(1))
    theirs = newton_schulz(g, COEFFS, STEPS, 1e-7)  # None: torch's own
    assert theirs.dtype == torch.bfloat16
    torch.testing.assert_close(theirs.double(), _closed_form(g), rtol=0, atol=5e-2)


def test_float32_muon_step_is_the_plain_loop_with_the_closed_form() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 10, bias=False)
    ref = copy.deepcopy(model.weight.detach()).double()
    lr, wd, mom = 0.02, 0.1, 0.95
    opt = ShardedMuon(
        model.parameters(),
        lr=lr,
        weight_decay=wd,
        momentum=mom,
        nesterov=True,
        adjust_lr_fn="match_rms_adamw",
        ns_dtype=torch.float32,
    )
    buf = torch.zeros_like(ref)
    for step in range(3):
        grad = torch.randn(10, 6, generator=torch.Generator().manual_seed(10 + step))
        model.weight.grad = grad.clone()
        opt.step()
        buf = buf + (1 - mom) * (grad.double() - buf)  # lerp toward the gradient
        update = grad.double() + mom * (buf - grad.double())  # Nesterov: lerp toward buf
        ref = ref * (1 - lr * wd) - _adjust_lr(lr, "match_rms_adamw", ref.shape) * _closed_form(
            update
        )
    torch.testing.assert_close(model.weight.detach().double(), ref, rtol=0, atol=1e-5)


def test_the_registry_orthogonalises_in_float32_on_cpu() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    muon = build_optimizer("muon", model, lr=1e-2).optimizers[0]
    assert isinstance(muon, ShardedMuon) and muon.ns_dtype == torch.float32
