"""Sharpness: the top eigenvalue of the loss Hessian at the current weights, on a fixed batch.

Gradient descent with step size ``eta`` is stable on a quadratic only while the curvature stays
below ``2 / eta``; in practice training drives the sharpness up to that threshold and hovers there
(the edge of stability, Cohen et al. 2021). Adam does the same with its *preconditioned* sharpness,
``lambda_max(P^-1 H)`` (Cohen et al. 2022). Logging one against the other is the measurement behind
"is my LR too high": sharpness pinned at the threshold means the LR, not the loss, sets the pace.

The Hessian is never formed: power iteration needs only Hessian-vector products, each one extra
backward pass through a graph built once (double backward). Power iteration finds the eigenvalue
of largest *magnitude*; that is the top one wherever the Hessian is nearly positive semi-definite
(late in training, near a minimum), but early on it can be a large negative one, and then a
second, shifted run finds the top one (``_top``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "HessianVectorProduct",
    "adam_preconditioner",
    "hessian_vector_product",
    "measure",
    "stability_threshold",
    "top_eigenvalue",
]

_SEED = 0x5A4D


def _rng_kept() -> contextlib.AbstractContextManager[None]:
    """Every torch stream (CPU and initialized CUDA devices) restored on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


class HessianVectorProduct:
    """``v -> H v`` for one loss: the first gradient (with its graph) is taken once and every
    product reuses it, so a power iteration costs one forward pass, not one per step."""

    def __init__(self, loss: Tensor, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self.grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]

    def __call__(self, vector: Sequence[Tensor]) -> list[Tensor]:
        dot = sum((g * v.to(g.dtype)).sum() for g, v in zip(self.grads, vector))
        if not isinstance(dot, Tensor) or not dot.requires_grad:  # loss linear in every param
            return [torch.zeros_like(p) for p in self.params]
        hv = torch.autograd.grad(dot, self.params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h for p, h in zip(self.params, hv)]


def hessian_vector_product(
    loss: Tensor, params: Sequence[Tensor], vector: Sequence[Tensor]
) -> list[Tensor]:
    """One product; for several at the same weights keep a :class:`HessianVectorProduct`."""
    return HessianVectorProduct(loss, params)(vector)


def _power_iteration(
    hvp: HessianVectorProduct,
    *,
    iters: int,
    tol: float,
    preconditioner: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    shift: float = 0.0,
) -> float:
    params = hvp.params
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    # D^-1/2 H D^-1/2 is symmetric (so power iteration and the Rayleigh quotient apply) and has
    # the eigenvalues of D^-1 H.
    scale = None
    if preconditioner is not None:
        scale = [d.detach().to(dtype).rsqrt() for d in preconditioner]
        if not all(bool(torch.isfinite(s).all()) for s in scale):
            raise ValueError("sharpness: the preconditioner must be positive")
    if generator is None:
        generator = torch.Generator().manual_seed(_SEED)
    # Drawn on the CPU from our own generator: the run's random streams are never touched.
    v = [torch.randn(p.shape, generator=generator, dtype=dtype).to(p.device) for p in params]

    def norm(xs: list[Tensor]) -> Tensor:
        return torch.sqrt(sum((x * x).sum() for x in xs))

    def apply(xs: list[Tensor]) -> list[Tensor]:
        ys = xs if scale is None else [x * s for x, s in zip(xs, scale)]
        out = [h.detach().to(dtype) for h in hvp(ys)]
        out = out if scale is None else [x * s for x, s in zip(out, scale)]
        # (H - shift I) v: its largest-magnitude eigenvalue is the top one once shifted past
        # the most negative one (see _top)
        return out if not shift else [o - shift * x for o, x in zip(out, xs)]

    n = norm(v)
    v = [x / n for x in v]
    eig = math.nan
    for _ in range(max(1, iters)):
        w = apply(v)
        new = float(sum((a * b).sum() for a, b in zip(v, w)))  # Rayleigh quotient, |v| = 1
        n = norm(w)
        if float(n) == 0.0:  # H v = 0: the Hessian vanishes (or v lies in its null space)
            return 0.0
        v = [x / n for x in w]
        converged = abs(new - eig) <= tol * abs(new)
        eig = new
        if converged:
            break
    return eig + shift


def _top(hvp: HessianVectorProduct, **kw: Any) -> float:
    """The largest eigenvalue, not the largest in magnitude. Power iteration finds the latter;
    where that is negative (early in training, away from a minimum, the Hessian has large
    negative directions), a second run on H - lambda_neg I, whose spectrum is then all >= 0,
    finds lambda_max - lambda_neg."""
    eig = _power_iteration(hvp, **kw)
    if eig >= 0:
        return eig
    return _power_iteration(hvp, **kw, shift=eig)


def top_eigenvalue(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    iters: int = 20,
    tol: float = 1e-4,
    preconditioner: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """The largest eigenvalue of the Hessian of ``loss_fn()`` in ``params`` or, given Adam's
    preconditioner ``d`` (positive, shaped like ``params``), of ``diag(d)^-1 H``.

    A read-only probe: ``.grad``, the weights and every RNG stream (``loss_fn`` may use dropout)
    are as they were, so a run that measures stays bitwise the run that does not.
    """
    params = list(params)
    with _rng_kept(), torch.enable_grad():
        hvp = HessianVectorProduct(loss_fn(), params)
        return _top(hvp, iters=iters, tol=tol, preconditioner=preconditioner, generator=generator)


def _kind(optimizer: torch.optim.Optimizer) -> str | None:
    """Subclasses and same-named wrappers count: cadence may wrap the torch optimizers."""
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.SGD) or name == "SGD":
        return "sgd"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) or name in ("Adam", "AdamW"):
        return "adam"
    return None


def stability_threshold(optimizer: torch.optim.Optimizer) -> tuple[float, str] | None:
    """The sharpness beyond which the optimizer in use diverges on a quadratic, as
    ``(threshold, "sharpness" | "preconditioned")``: which eigenvalue to hold against it.

    Gradient descent: ``2/eta``; heavy-ball momentum ``beta``: ``(2 + 2 beta)/eta`` (Cohen et al.
    2021), dampening ``tau`` making ``eta`` ``(1 - tau) eta``; Nesterov: ``(2 + 2 beta)/((1 +
    2 beta) eta)``; Adam(W): ``(2 + 2 beta1)/((1 - beta1) eta)`` on the preconditioned sharpness
    (Cohen et al. 2022). None where no such result is known (Muon, Lion, schedule-free, ...) or
    the LR is 0. Read from the first param group.
    """
    kind = _kind(optimizer)
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    lr = float(group.get("lr", 0.0))
    if kind is None or lr <= 0:
        return None
    if kind == "adam":
        beta1 = float(group.get("betas", (0.9, 0.999))[0])
        return (2 + 2 * beta1) / ((1 - beta1) * lr), "preconditioned"
    beta = float(group.get("momentum", 0.0))
    if beta == 0:
        return 2 / lr, "sharpness"
    if group.get("nesterov", False):
        return (2 + 2 * beta) / ((1 + 2 * beta) * lr), "sharpness"
    # Dampening tau scales the momentum buffer's input, so the effective step is (1 - tau) eta.
    effective = lr * (1 - float(group.get("dampening", 0.0)))
    return ((2 + 2 * beta) / effective, "sharpness") if effective > 0 else None


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
) -> list[Tensor] | None:
    """Adam's diagonal ``P = (1 - beta1^t) (sqrt(v_t / (1 - beta2^t)) + eps)`` (Cohen et al.
    2022), under which its step on a quadratic is preconditioned gradient descent.

    None before the first step (no second moments yet) or where ``P`` is not positive
    (``eps = 0`` and a coordinate that never saw a gradient).
    """
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for p in params:
        state, group = optimizer.state.get(p), groups.get(id(p))
        if not state or group is None or "exp_avg_sq" not in state or "step" not in state:
            return None
        t = float(state["step"])
        beta1, beta2 = (float(b) for b in group.get("betas", (0.9, 0.999)))
        v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        v = v.detach().to(torch.float64 if p.dtype == torch.float64 else torch.float32)
        d = (1 - beta1**t) * ((v / (1 - beta2**t)).sqrt() + float(group.get("eps", 1e-8)))
        if not bool((d > 0).all()):
            return None
        out.append(d)
    return out


def measure(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    iters: int = 20,
) -> dict[str, float]:
    """The metrics row of one ``train.sharpness_every`` measurement: ``sharpness``, for Adam(W)
    ``precond_sharpness``, and ``sharpness_threshold`` where the optimizer has one. Both
    eigenvalues share one forward pass."""
    params = list(params)
    precond = adam_preconditioner(optimizer, params) if _kind(optimizer) == "adam" else None
    with _rng_kept(), torch.enable_grad():
        hvp = HessianVectorProduct(loss_fn(), params)
        row = {"sharpness": _power_iteration(hvp, iters=iters, tol=1e-4)}
        if precond is not None:
            row["precond_sharpness"] = _power_iteration(
                hvp, iters=iters, tol=1e-4, preconditioner=precond
            )
    threshold = stability_threshold(optimizer)
    if threshold is not None:
        row["sharpness_threshold"] = threshold[0]
    return row
