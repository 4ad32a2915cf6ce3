"""The learning-rate range test: ramp the LR exponentially, watch the loss, suggest an LR.

Why each choice:

* The ramp is exponential (uniform in log LR) because useful LRs span decades; the suggestion is
  the steepest descent of the loss against *log* LR. Differentiating against the LR itself (as
  PyTorch Lightning's finder does) divides the slope by the LR and so drags the suggestion
  towards the small end of the range, where nothing is happening yet.
* The loss is smoothed with an EMA whose start-up bias is corrected (Adam's ``1 - beta**t``), so
  the first points are not pulled towards zero. An EMA also *lags*: a linear trend comes out
  delayed by the EMA's mean age. We know that delay exactly for each step and move every smoothed
  point back by it in log-LR, instead of letting the lag push the suggestion to larger LRs.
* Early spikes (the first steps of Adam, a bad first batch) make a steep *recovery* that is not
  progress; only points whose loss is below the starting level and before the minimum qualify.
* The test stops once the smoothed loss exceeds ``diverge_factor`` x its best (or is not finite),
  and the model, the optimizer (when one is passed in) and the RNG are restored afterwards, so a
  trainer can call it before training (``optimizer.lr: auto``) without any trace.

Every step is the trainer's own :func:`cadence.training.train_step` (micro-batches, clipping,
bf16 autocast), with the optimizer the config names, so the test covers every optimizer.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cadence.config import ConfigError
from cadence.config.parts import optimizer_from
from cadence.config.validate import fixed_batch
from cadence.optim import OPTIMIZERS
from cadence.schedules import split_micro
from cadence.training.rng import rng_preserved
from cadence.training.step import autocast_context, train_step

if TYPE_CHECKING:
    from cadence.config import Config
    from cadence.optim import AnyOptimizer
    from cadence.workloads import Workload

__all__ = [
    "LRFindResult",
    "draw_batches",
    "ema_lag",
    "lr_range_test",
    "plot_lr_find",
    "smooth_losses",
    "suggest_from_curve",
    "suggest_lr",
]

ProgressFn = Callable[[int, int, float, float], None]  # (step, total, lr, loss)


@dataclass
class LRFindResult:
    """One range test (the mean curve over seeds) and what it suggests."""

    lrs: list[float]  # LR of each step, the same ramp for every seed
    losses: list[float]  # raw training loss at each step (mean over seeds)
    smoothed: list[float]  # bias-corrected EMA of the losses (mean over seeds)
    smoothed_lrs: list[float]  # the LR each smoothed point stands for, after removing the EMA lag
    suggestion: float  # min(steepest_lr, min_loss_lr / 10): what to train with
    steepest_lr: float  # steepest descent of the smoothed loss against log LR
    min_loss_lr: float  # LR at the minimum of the smoothed loss
    diverged_lr: float | None  # first LR where a seed's loss diverged (None: never)
    seeds: list[int]
    per_seed_suggestions: list[float]
    steps: int  # optimizer steps taken over all seeds (the compute spent)
    samples: int  # training samples seen over all seeds
    wall_time_s: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- pure curve analysis


def smooth_losses(losses: Sequence[float], beta: float, log: bool = False) -> list[float]:
    """Bias-corrected EMA: ``m_t = beta m_{t-1} + (1 - beta) x_t``, reported as ``m_t / (1 - beta^t)``.

    With ``log`` the EMA runs over ``log(loss)`` (a geometric mean): a loss that falls by orders
    of magnitude is then a straight line that the EMA only shifts, not one it drags out.
    """
    out, m = [], 0.0
    for t, x in enumerate(losses, start=1):
        m = beta * m + (1.0 - beta) * (math.log(x) if log else x)
        v = m / (1.0 - beta**t)
        out.append(math.exp(v) if log else v)
    return out


def ema_lag(t: int, beta: float) -> float:
    """Mean age (in steps) of the bias-corrected EMA after ``t + 1`` values.

    The weight of the value ``k`` steps old is ``(1 - beta) beta^k / (1 - beta^(t+1))``; a linear
    trend seen through the EMA is the trend ``sum_k k w_k`` steps earlier.
    """
    if beta <= 0.0:
        return 0.0
    k = np.arange(t + 1, dtype=np.float64)
    w = (1.0 - beta) * beta**k
    return float((k * w).sum() / w.sum())


def _local_slopes(x: np.ndarray, y: np.ndarray, half_width: int) -> np.ndarray:
    """Least-squares slope dy/dx over a window of ``2 h + 1`` points around each point."""
    n = len(x)
    slopes = np.full(n, np.nan)
    for i in range(n):
        lo, hi = max(0, i - half_width), min(n, i + half_width + 1)
        if hi - lo < 2:
            continue
        xs, ys = x[lo:hi], y[lo:hi]
        dx = xs - xs.mean()
        denom = float((dx * dx).sum())
        if denom > 0:
            slopes[i] = float((dx * (ys - ys.mean())).sum()) / denom
    return slopes


def suggest_from_curve(
    lrs: Sequence[float],
    losses: Sequence[float],
    *,
    skip_start: int | None = None,
    half_width: int = 2,
    start_level: float | None = None,
) -> tuple[float, int]:
    """The LR of the steepest descent of ``losses`` against ``log(lr)`` -> (lr, index).

    Only points after ``skip_start``, up to the minimum of the curve and whose whole slope window
    lies below the starting level qualify, so a steep recovery from an early spike is not mistaken for progress.
    ``start_level`` defaults to the median loss of the skipped start.
    """
    x = np.log(np.asarray(lrs, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    finite = np.isfinite(y)
    if finite.sum() < 3:
        raise ValueError("the range test produced fewer than 3 finite losses; widen the LR range")
    n = int(np.argmax(~finite)) if not finite.all() else len(y)  # stop at the first non-finite
    x, y = x[:n], y[:n]
    if skip_start is None:
        skip_start = max(1, n // 20)
    skip_start = min(skip_start, max(0, n - 3))
    i_min = int(np.argmin(y))
    level = start_level if start_level is not None else float(np.median(y[: skip_start + 1]))
    slopes = _local_slopes(x, y, half_width)
    candidates = [
        i
        for i in range(skip_start, i_min + 1)
        if np.isfinite(slopes[i])
        and slopes[i] < 0
        and y[max(0, i - half_width) : i + half_width + 1].max() <= level
    ]
    if not candidates:
        # The loss never went down below where it started: the range starts too late (or the
        # model cannot learn at all). The best we can say is "below the minimum".
        i = max(0, i_min - 1)
        return float(math.exp(x[i])), i
    best = min(candidates, key=lambda i: slopes[i])
    return float(math.exp(x[best])), best


# ---------------------------------------------------------------- running the test


def draw_batches(cfg: Config, workload: Workload, indices: torch.Tensor) -> tuple[list[Any], int]:
    """The micro-batches (``batch.micro_size``) for these indices and their total unit count."""
    micro, start = [], 0
    for n in split_micro(len(indices), cfg.batch.micro_size):
        micro.append(workload.batch(indices[start : start + n]))
        start += n
    return micro, sum(workload.units(m) for m in micro)


def _batch_size(cfg: Config, workload: Workload) -> int:
    return fixed_batch(cfg, workload.n_train, "the LR range test")


def _one_curve(
    cfg: Config,
    workload: Workload,
    optimizer: AnyOptimizer,
    ramp: np.ndarray,
    seed: int,
    beta: float,
    diverge_factor: float,
    progress: ProgressFn | None,
) -> tuple[list[float], int]:
    """Raw losses along the ramp (stopping at divergence) and the step of divergence or -1."""
    model = workload.model
    model.train()
    full = cfg.batch.size == "full"
    size = _batch_size(cfg, workload)
    sampler = workload.sampler(seed, shuffle=not full)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = autocast_context(next(model.parameters()).device, cfg.train.precision)
    # Each group keeps its ratio to the main LR (Muon's aux_lr, per-group LRs).
    ref = float(optimizer.param_groups[0].get("base_lr", optimizer.param_groups[0]["lr"]))
    ratios = [float(g.get("base_lr", g["lr"])) / ref for g in optimizer.param_groups]
    losses: list[float] = []
    best, m = math.inf, 0.0
    for k, lr in enumerate(ramp):
        for g, r in zip(optimizer.param_groups, ratios):
            g["lr"] = float(lr) * r
        micro, units = draw_batches(cfg, workload, sampler.indices(k * size, size))
        out = train_step(
            model,
            optimizer,
            workload.loss_sum,
            micro,
            units,
            clip_grad_norm=cfg.train.clip_grad_norm,
            autocast=autocast,
            params=params,
        )
        value = float(
            out[0]
        )  # (loss, grad norm[, stepped]): the loss comes first  # the range test must look at every step to see divergence
        losses.append(value)
        if progress is not None:
            progress(k + 1, len(ramp), float(lr), value)
        if not math.isfinite(value):
            return losses, k
        m = beta * m + (1.0 - beta) * value
        smooth = m / (1.0 - beta ** (k + 1))
        best = min(best, smooth)
        if k > 0 and smooth > diverge_factor * best:
            return losses, k
    return losses, -1


def lr_range_test(
    cfg: Config,
    workload: Workload | None = None,
    *,
    min_lr: float = 1e-6,
    max_lr: float = 10.0,
    steps: int = 100,
    beta: float = 0.8,
    diverge_factor: float = 4.0,
    seeds: Sequence[int] | None = None,
    optimizer: AnyOptimizer | None = None,
    progress: ProgressFn | None = None,
) -> LRFindResult:
    """Run the LR range test with the config's optimizer, batch size and model.

    ``seeds`` vary the data order (each seed starts from the same weights); the suggestion is taken
    from the mean smoothed curve. Pass the trainer's ``optimizer`` to test *it*: its state is put
    back afterwards; otherwise a fresh optimizer is built from the config for each seed. The
    model's weights, train/eval mode and the torch RNG are restored either way.
    """
    if OPTIMIZERS[cfg.optimizer.name].lr_free:
        raise ConfigError(
            f"optimizer.name: {cfg.optimizer.name} estimates its own step size, so there is no "
            "learning rate to range-test; train it with optimizer.lr=1.0"
        )
    if not (0 < min_lr < max_lr):
        raise ValueError(f"lr range: need 0 < min_lr < max_lr, got {min_lr} and {max_lr}")
    if steps < 5:
        raise ValueError(f"lr range test: need at least 5 steps, got {steps}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"smoothing: must be in [0, 1), got {beta}")
    if diverge_factor <= 1.0:
        raise ValueError(f"diverge factor: must be > 1, got {diverge_factor}")
    if workload is None:
        from cadence.workloads import build_workload

        workload = build_workload(cfg)
    seeds = list(seeds) if seeds else [cfg.train.seed]
    model = workload.model
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    was_training = model.training
    ramp = np.exp(np.linspace(math.log(min_lr), math.log(max_lr), steps))
    t0 = time.perf_counter()
    curves: list[list[float]] = []
    diverged: list[int] = []
    with rng_preserved():  # the run continues on the streams it had
        try:
            for seed in seeds:
                model.load_state_dict(weights)
                if optimizer is not None:
                    optimizer.load_state_dict(copy.deepcopy(opt_state))
                    opt = optimizer
                else:
                    opt = optimizer_from(cfg, model)  # (with lr: auto at AUTO_LR_PLACEHOLDER)
                raw, k = _one_curve(cfg, workload, opt, ramp, seed, beta, diverge_factor, progress)
                curves.append(raw)
                diverged.append(k)
        finally:
            model.load_state_dict(weights)
            for p in model.parameters():
                p.grad = None
            if optimizer is not None:
                optimizer.load_state_dict(copy.deepcopy(opt_state))
            model.train(was_training)

    wall = time.perf_counter() - t0
    size = _batch_size(cfg, workload)
    n_steps = sum(len(c) for c in curves)
    finite = [_finite_prefix(c) for c in curves]
    # Positive losses (cross-entropy, squared error) are smoothed and differentiated as log(loss):
    # the slope is then the *relative* progress per log-LR, and scale-free.
    log = all(v > 0 for c in finite for v in c)
    smoothed_curves = [smooth_losses(c, beta, log=log) for c in finite]
    per_seed = [
        min(_suggest(ramp, s, beta, c, log)[0], _argmin_lr(ramp, s, beta) / 10.0)
        for s, c in zip(smoothed_curves, finite)
    ]
    n = min(len(s) for s in smoothed_curves)
    agg = _geomean if log else _mean
    mean_raw = agg([c[:n] for c in finite])
    mean_smooth = agg([s[:n] for s in smoothed_curves])
    steepest, lag_lrs = _suggest(ramp, mean_smooth, beta, mean_raw, log)
    i_min = int(np.argmin(mean_smooth))
    # The minimum of a range test lies past the edge of stability: an unstable direction needs
    # several steps to grow into view while the ramp keeps climbing (on a quadratic one can watch
    # it happen). Near the minimum the loss can still be falling steeply, so the suggestion is
    # never more than a tenth of the LR at the minimum (the classic rule of the range test).
    suggestion = min(steepest, lag_lrs[i_min] / 10.0)
    div = [k for k in diverged if k >= 0]
    return LRFindResult(
        lrs=ramp[:n].tolist(),
        losses=mean_raw,
        smoothed=mean_smooth,
        smoothed_lrs=lag_lrs,
        suggestion=suggestion,
        steepest_lr=steepest,
        min_loss_lr=lag_lrs[i_min],
        diverged_lr=float(ramp[min(div)]) if div else None,
        seeds=seeds,
        per_seed_suggestions=per_seed,
        steps=n_steps,
        samples=n_steps * size,
        wall_time_s=wall,
        settings={
            "min_lr": min_lr,
            "max_lr": max_lr,
            "steps": steps,
            "beta": beta,
            "diverge_factor": diverge_factor,
            "batch_size": size,
            "optimizer": cfg.optimizer.name,
            "workload": cfg.workload,
            "log_loss": log,
        },
    )


def _argmin_lr(ramp: np.ndarray, smoothed: Sequence[float], beta: float) -> float:
    """The lag-corrected LR at the minimum of one smoothed curve."""
    t = int(np.argmin(smoothed))
    return float(ramp[t] * math.exp(-ema_lag(t, beta) * math.log(ramp[1] / ramp[0])))


def _mean(curves: list[list[float]]) -> list[float]:
    return np.mean(np.asarray(curves, dtype=np.float64), axis=0).tolist()


def _geomean(curves: list[list[float]]) -> list[float]:
    return np.exp(np.mean(np.log(np.asarray(curves, dtype=np.float64)), axis=0)).tolist()


def _finite_prefix(values: Sequence[float]) -> list[float]:
    out = []
    for v in values:
        if not math.isfinite(v):
            break
        out.append(v)
    return out


def _suggest(
    ramp: np.ndarray, smoothed: Sequence[float], beta: float, raw: Sequence[float], log: bool
) -> tuple[float, list[float]]:
    """Suggestion from a smoothed curve, with each point moved back by the EMA's lag."""
    n = len(smoothed)
    if n < 3:
        raise ValueError(
            "the loss diverged within the first steps of the range test; lower --min-lr"
        )
    log_step = math.log(ramp[1] / ramp[0])
    lag_lrs = [float(ramp[t] * math.exp(-ema_lag(t, beta) * log_step)) for t in range(n)]
    skip = max(1, n // 20)
    start = np.asarray(raw[: skip + 1], dtype=np.float64)
    y = np.log(np.asarray(smoothed, dtype=np.float64)) if log else np.asarray(smoothed)
    level = float(np.median(np.log(start) if log else start))
    lr, _ = suggest_from_curve(lag_lrs, y.tolist(), skip_start=skip, start_level=level)
    return lr, lag_lrs


def suggest_lr(
    cfg: Config,
    workload: Workload | None = None,
    run_dir: str | Path | None = None,
    **kwargs: Any,
) -> float:
    """The range test's suggested ``optimizer.lr`` for this config (for ``optimizer.lr: auto``).

    Writes ``lr_find.json`` and ``plots/lr_find.png`` into ``run_dir`` when one is given.
    """
    result = lr_range_test(cfg, workload, **kwargs)
    if run_dir is not None:
        write_lr_find(result, Path(run_dir))
    return result.suggestion


# ---------------------------------------------------------------- outputs


def write_lr_find(result: LRFindResult, out_dir: Path) -> tuple[Path, Path]:
    """``lr_find.json`` and ``plots/lr_find.png`` in ``out_dir``; both written atomically."""
    from cadence.io import atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "lr_find.json"
    atomic_write_json(json_path, result.to_dict())
    png = plot_lr_find(result, out_dir / "plots" / "lr_find.png")
    return json_path, png


def plot_lr_find(result: LRFindResult, path: Path) -> Path:
    """Loss against LR (log axis): raw points, the smoothed curve, the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cadence.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result.lrs, result.losses, ".", color="0.6", ms=3, label="loss (raw)")
    ax.plot(result.smoothed_lrs, result.smoothed, "-", color="C0", label="loss (smoothed)")
    ax.axvline(result.suggestion, color="C3", ls="--", label=f"suggestion {result.suggestion:.3g}")
    if result.diverged_lr is not None:
        ax.axvline(
            result.diverged_lr, color="k", ls=":", label=f"diverged {result.diverged_lr:.3g}"
        )
    ax.set_xscale("log")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-12), hi + 0.25 * (hi - lo + 1e-12))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    s = result.settings
    ax.set_title(f"LR range test · {s.get('workload', '')} · {s.get('optimizer', '')}")
    ax.legend(loc="best", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
