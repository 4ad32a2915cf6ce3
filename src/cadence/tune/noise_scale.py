"""The critical batch size from the gradient noise scale (McCandlish et al., 2018).

The estimators and the periodic probe live in :mod:`cadence.training.noise` (the trainer's
``batch.schedule: auto`` measures with them); this module turns them into what a user asks
for: ``cadence find-batch`` (:func:`estimate_noise_scale` at fixed weights, with the LR that
goes with the critical batch) and the ``train.log_noise_scale`` monitor.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cadence.config.validate import fixed_batch
from cadence.runtime.events import Callback
from cadence.training.noise import (
    NoiseProbe,
    NoiseScaleEstimator,
    draw_iid,
    measure_grad_norms,
    unbiased_estimates,
)

if TYPE_CHECKING:
    from cadence.config import Config
    from cadence.runtime.events import TrainerView
    from cadence.workloads import Workload

__all__ = [
    "NoiseScaleEstimate",
    "NoiseScaleEstimator",
    "NoiseScaleMonitor",
    "estimate_noise_scale",
    "lr_for_batch",
    "measure_grad_norms",
    "unbiased_estimates",
]


def lr_for_batch(lr: float, batch: float, noise_scale: float, new_batch: float) -> float:
    """McCandlish et al.'s ``eps_opt(B) = eps_max / (1 + B_noise / B)``, anchored at a known LR.

    ``lr`` is good at ``batch``; the LR that goes with ``new_batch`` keeps ``eps_max`` fixed. At
    the critical batch (``new_batch = B_noise``) it is half of ``eps_max``. Derived for SGD; for
    adaptive optimizers it is a starting point, not a law.
    """
    if noise_scale <= 0 or not math.isfinite(noise_scale):
        return lr
    eps_max = lr * (1.0 + noise_scale / batch)
    return eps_max / (1.0 + noise_scale / new_batch)


@dataclass
class NoiseScaleEstimate:
    """What ``cadence find-batch`` reports (and writes as ``noise_scale.json``)."""

    b_simple: float  # tr(Sigma) / |G|^2 in samples: the critical batch size
    grad_sq: float  # |G|^2 estimate
    trace: float  # tr(Sigma) estimate
    b_small: int
    b_big: int
    measurements: int
    batch_size: int  # the config's batch.size (the LR's anchor)
    lr: float  # the config's optimizer.lr
    critical_batch: int  # B_simple rounded to a whole batch (>= 1)
    critical_lr: float  # lr_for_batch(lr, batch_size, B_simple, critical_batch)
    history: list[float]  # B_simple after each measurement (convergence check)
    train_steps: int  # steps trained before measuring
    samples: int  # samples spent on the measurement (forward + backward each)
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def estimate_noise_scale(
    cfg: Config,
    workload: Workload | None = None,
    *,
    b_small: int | None = None,
    b_big: int | None = None,
    measurements: int = 20,
    train_steps: int = 0,
    seed: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> NoiseScaleEstimate:
    """Estimate ``B_simple`` at the model's weights (after ``train_steps`` of real training).

    The noise scale grows as training proceeds (the gradient shrinks faster than its noise), so
    a measurement at initialisation underestimates the batch size that pays off later.
    """
    from cadence.workloads import build_workload

    if workload is None:
        workload = build_workload(cfg)
    base = fixed_batch(cfg, workload.n_train, "the noise-scale measurement")
    small = b_small or max(1, base // 8)
    big = b_big or small * 16
    if small < 1 or big <= small or big % small:
        raise ValueError(
            f"noise scale: the big batch must be a multiple > 1 of the small one, got {small}, {big}"
        )
    if measurements < 1:
        raise ValueError(f"noise scale: need at least 1 measurement, got {measurements}")
    if train_steps > 0:
        train_first(cfg, workload, train_steps)
    model = workload.model
    model.train()
    gen = torch.Generator().manual_seed(cfg.train.seed if seed is None else seed)
    est = NoiseScaleEstimator(beta=None)
    history: list[float] = []
    t0 = time.perf_counter()
    k = big // small
    for m in range(measurements):
        drawn = [draw_iid(workload, gen, small) for _ in range(k)]
        g2_small, g2_big = measure_grad_norms(
            model, workload.loss_sum, [b for b, _ in drawn], [u for _, u in drawn]
        )
        est.update(g2_small, g2_big, small, big)
        history.append(est.b_simple)
        if progress is not None:
            progress(m + 1, measurements, est.b_simple)
    b = est.b_simple
    crit = max(1, round(b)) if math.isfinite(b) and b > 0 else base
    lr = float(cfg.optimizer.lr) if isinstance(cfg.optimizer.lr, (int, float)) else math.nan
    return NoiseScaleEstimate(
        b_simple=b,
        grad_sq=est.grad_sq,
        trace=est.trace,
        b_small=small,
        b_big=big,
        measurements=measurements,
        batch_size=base,
        lr=lr,
        critical_batch=crit,
        critical_lr=lr_for_batch(lr, base, b, crit),
        history=history,
        train_steps=train_steps,
        samples=measurements * big,
        wall_time_s=time.perf_counter() - t0,
    )


def train_first(cfg: Config, workload: Workload, steps: int) -> None:
    """Run the real trainer for ``steps`` steps (no run directory, no progress bar)."""
    from cadence.training import Trainer, fit

    t = dataclasses.replace(
        cfg.train, max_steps=steps, eval_every=steps, progress=False, checkpoint_every=None
    )
    cfg = dataclasses.replace(cfg, train=t)
    fit(Trainer(cfg, workload))


class NoiseScaleMonitor(Callback):
    """Log ``B_simple`` every ``every`` steps during training (``train.log_noise_scale``).

    An observer around a :class:`~cadence.training.noise.NoiseProbe` (which says what a
    measurement costs and leaves untouched): each measurement goes into that step's metrics row
    (``trainer.log_metrics``: the step is logged), into ``self.rows`` and, when the trainer has a
    run directory, into ``noise_scale.jsonl`` there (written by rank 0). The probe's state is
    checkpointed with the run (``state_key``), so a resumed run measures as an uninterrupted one.
    ``batch.schedule: auto`` measures with a probe of the Trainer's own instead.
    """

    state_key = "noise_scale"

    def __init__(
        self, every: int = 100, b_small: int | None = None, k: int = 8, beta: float = 0.9
    ) -> None:
        self.probe = NoiseProbe(every, b_small, k, beta)
        self._restored = False  # a resumed run's generator comes from the checkpoint

    @property
    def rows(self) -> list[dict[str, float]]:
        return self.probe.rows

    @property
    def estimator(self) -> NoiseScaleEstimator:
        return self.probe.estimator

    def on_start(self, trainer: TrainerView) -> None:
        if not self._restored:
            self.probe.gen.manual_seed(trainer.cfg.train.seed + 7919)
        self.probe.keep_until(trainer.state.step, trainer.run_dir, trainer.world)

    def on_rewind(self, trainer: TrainerView, step: int) -> None:
        # the checkpoint brought the probe back to `step`
        self.probe.keep_until(step, trainer.run_dir, trainer.world)

    def on_step(self, trainer: TrainerView) -> None:
        self.probe.observe(trainer)

    def state_dict(self) -> dict[str, Any]:
        return self.probe.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probe.load_state_dict(state)
        self._restored = "generator" in state
