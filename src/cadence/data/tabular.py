"""The convex workload: logistic regression on breast cancer, with its exact optimum.

Knowing J* lets optimizers be compared by suboptimality J(theta) - J*, which is
the cleanest signal a training-strategy benchmark can have.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from cadence.data.vision import split_indices


def expit(z: np.ndarray) -> np.ndarray:
    """The logistic function. scipy.special.expit, imported only for this, cost a quarter
    second of every cadence start; this form neither overflows nor loses the tails."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


__all__ = [
    "load_breast_cancer_split",
    "logreg_grad",
    "logreg_loss",
    "logreg_optimum",
]

ArrayLike = np.ndarray | torch.Tensor


def load_breast_cancer_split(
    val_fraction: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X_train, y_train, X_val, y_val) as float64 tensors, y in {0., 1.}.

    Features are standardised with TRAIN statistics only, so no validation
    information leaks into training; the split is the fixed one of
    :func:`split_indices` (seed 0).
    """
    from cadence.data import sklearn_files

    x, labels = sklearn_files.breast_cancer()
    y = labels.astype(np.float64)
    train_idx, val_idx = split_indices(x.shape[0], val_fraction)
    tr, va = train_idx.numpy(), val_idx.numpy()
    mean = x[tr].mean(axis=0)
    std = x[tr].std(axis=0)
    std[std == 0] = 1.0
    xs = (x - mean) / std
    return (
        torch.from_numpy(xs[tr].copy()),
        torch.from_numpy(y[tr].copy()),
        torch.from_numpy(xs[va].copy()),
        torch.from_numpy(y[va].copy()),
    )


def _np64(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _prep(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    xa, ya = _np64(x), _np64(y).ravel()
    if xa.ndim != 2 or xa.shape[0] != ya.shape[0]:
        raise ValueError(f"X must be [n, d] and y [n]; got {xa.shape} and {ya.shape}")
    return xa, ya


def _loss(xa: np.ndarray, ya: np.ndarray, theta: np.ndarray, l2: float) -> float:
    w, b = theta[:-1], theta[-1]
    z = xa @ w + b
    # softplus(z) - y*z == BCE with logits, written stably.
    return float(np.mean(np.logaddexp(0.0, z) - ya * z) + 0.5 * l2 * (w @ w))


def _grad(xa: np.ndarray, ya: np.ndarray, theta: np.ndarray, l2: float) -> np.ndarray:
    w, b = theta[:-1], theta[-1]
    r = expit(xa @ w + b) - ya
    n = xa.shape[0]
    return np.concatenate([xa.T @ r / n + l2 * w, [r.sum() / n]])


def logreg_loss(X: ArrayLike, y: ArrayLike, theta: ArrayLike, l2: float = 0.0) -> float:
    """J(theta) = mean BCE-with-logits + (l2/2)||w||^2 in float64; theta = [w..., b].

    Identical to what ``LogisticRegression`` + ``binary_cross_entropy_with_logits``
    plus an L2 penalty on the weight (not the bias) compute, so the trainer's loss
    and J* are directly comparable.
    """
    xa, ya = _prep(X, y)
    return _loss(xa, ya, _np64(theta).ravel(), l2)


def logreg_grad(X: ArrayLike, y: ArrayLike, theta: ArrayLike, l2: float = 0.0) -> np.ndarray:
    """Gradient of :func:`logreg_loss` with respect to theta = [w..., b], float64."""
    xa, ya = _prep(X, y)
    return _grad(xa, ya, _np64(theta).ravel(), l2)


def _separating_direction(xa: np.ndarray, ya: np.ndarray) -> np.ndarray | None:
    """A unit theta with s_i (x_i.w + b) >= margin > 0 for all i, or None if none exists.

    Feasibility LP: find (w, b) with s_i (x_i.w + b) >= 1; feasible iff separable.
    """
    from scipy.optimize import linprog

    s = 2.0 * ya - 1.0
    a = np.hstack([xa, np.ones((xa.shape[0], 1))]) * s[:, None]
    d = a.shape[1]
    res = linprog(
        np.zeros(d), A_ub=-a, b_ub=-np.ones(a.shape[0]), bounds=[(None, None)] * d, method="highs"
    )
    if res.status != 0:
        return None
    theta = np.asarray(res.x, dtype=np.float64)
    return theta / np.linalg.norm(theta)


def logreg_optimum(
    X: ArrayLike, y: ArrayLike, l2: float = 0.0, tol: float = 1e-13, max_iter: int = 200
) -> tuple[np.ndarray, float]:
    """Exact minimiser of :func:`logreg_loss`: returns (theta* = [w..., b], J*).

    Damped Newton with Armijo backtracking in float64 from theta = 0, iterated until
    the gradient norm is below ``tol`` (quadratic convergence makes 1e-13 cheap).

    With ``l2 == 0`` and linearly separable data there is no minimiser: J can be
    driven to 0 by scaling a separating hyperplane, so the infimum is J* = 0. That
    case is detected with an LP and the result is (unit separating direction, 0.0)
    with a RuntimeWarning. The standardised breast cancer train split is separable,
    which is why the workload uses a small l2 (e.g. 1e-3) so that J* is attained.
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    xa, ya = _prep(X, y)
    n, d = xa.shape
    if l2 == 0.0:
        direction = _separating_direction(xa, ya)
        if direction is not None:
            warnings.warn(
                "logreg_optimum: data are linearly separable and l2 == 0, so no finite "
                "optimum exists; returning a separating direction and J* = 0 (the infimum)",
                RuntimeWarning,
                stacklevel=2,
            )
            return direction, 0.0

    xb = np.hstack([xa, np.ones((n, 1))])
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0
    theta = np.zeros(d + 1)
    f = _loss(xa, ya, theta, l2)
    for _ in range(max_iter):
        g = _grad(xa, ya, theta, l2)
        if np.linalg.norm(g) < tol:
            break
        p = expit(xb @ theta)
        h = (xb * (p * (1.0 - p))[:, None]).T @ xb / n + np.diag(reg)
        try:
            step = -np.linalg.solve(h, g)
        except np.linalg.LinAlgError:
            step = -np.linalg.lstsq(h, g, rcond=None)[0]
        slope = g @ step
        if slope >= 0:  # numerically indefinite: fall back to steepest descent
            step, slope = -g, -(g @ g)
        t = 1.0
        while True:
            cand = theta + t * step
            f_new = _loss(xa, ya, cand, l2)
            if f_new <= f + 1e-4 * t * slope or t < 1e-12:
                break
            t *= 0.5
        if t < 1e-12 and f_new > f:
            break  # no further decrease representable in float64
        theta, f = cand, f_new
    return theta, _loss(xa, ya, theta, l2)
