"""The gradient noise scale (McCandlish et al., 2018) measured at a model's current weights.

``B_simple = tr(Sigma) / |G|^2``: per-sample gradient noise against the true gradient's size.
Below ``B_simple`` a bigger batch buys almost proportionally fewer steps; above it, little.

Computing ``tr(Sigma)`` from per-sample gradients is expensive; instead we use the squared norms
of two mini-batch gradients, for ``E|g_B|^2 = |G|^2 + tr(Sigma) / B``:

    |G|^2     ~ (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|g_small|^2 - |g_big|^2) / (1 / B_small - 1 / B_big)

Both are unbiased, but their ratio is not, and single estimates are very noisy (``|G|^2`` can come
out negative), so numerator and denominator are averaged *separately* (an EMA during training, a
plain mean at fixed weights) and divided only at the end. The big gradient is the mean of ``k``
small ones (``B_big = k B_small``): one backward pass per small batch gives both, exactly as
gradient accumulation (or data parallelism) would.

This is the training layer's half: the estimators and :class:`NoiseProbe`, the periodic
measurement that ``batch.schedule: auto`` decides from inside the Trainer and that the
``train.log_noise_scale`` monitor (cadence.tune) logs. ``cadence find-batch`` builds on it too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cadence.io import atomic_write_text
from cadence.training.rng import rng_preserved

if TYPE_CHECKING:
    from cadence.runtime.distributed import World
    from cadence.runtime.events import TrainerView
    from cadence.workloads import Workload

__all__ = [
    "NoiseProbe",
    "NoiseScaleEstimator",
    "draw_iid",
    "measure_grad_norms",
    "unbiased_estimates",
]


def unbiased_estimates(
    g2_small: float, g2_big: float, b_small: float, b_big: float
) -> tuple[float, float]:
    """``(|G|^2, tr(Sigma))`` from squared gradient norms at two batch sizes (each unbiased)."""
    if not 0 < b_small < b_big:
        raise ValueError(f"noise scale: need 0 < small batch < big batch, got {b_small}, {b_big}")
    g2 = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
    trace = (g2_small - g2_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


class NoiseScaleEstimator:
    """Separate averages of the ``|G|^2`` and ``tr(Sigma)`` estimates; ``B_simple`` is their ratio.

    ``beta=None`` weighs every measurement equally (right at fixed weights); a float is an EMA with
    Adam's bias correction (right during training, where the true values drift).
    """

    def __init__(self, beta: float | None = 0.9) -> None:
        if beta is not None and not 0.0 <= beta < 1.0:
            raise ValueError(f"noise scale EMA: beta must be in [0, 1) or None, got {beta}")
        self.beta = beta
        self.count = 0
        self._g2 = 0.0
        self._trace = 0.0

    def update(self, g2_small: float, g2_big: float, b_small: float, b_big: float) -> None:
        g2, trace = unbiased_estimates(g2_small, g2_big, b_small, b_big)
        self.count += 1
        if self.beta is None:
            self._g2 += (g2 - self._g2) / self.count
            self._trace += (trace - self._trace) / self.count
        else:
            self._g2 = self.beta * self._g2 + (1.0 - self.beta) * g2
            self._trace = self.beta * self._trace + (1.0 - self.beta) * trace

    def _corrected(self, value: float) -> float:
        if self.count == 0:
            return math.nan
        if self.beta is None:
            return value
        return value / (1.0 - self.beta**self.count)

    @property
    def grad_sq(self) -> float:
        """The estimate of ``|G|^2``."""
        return self._corrected(self._g2)

    @property
    def trace(self) -> float:
        """The estimate of ``tr(Sigma)`` (per-sample gradient covariance)."""
        return self._corrected(self._trace)

    @property
    def b_simple(self) -> float:
        """``tr(Sigma) / |G|^2``; inf when the gradient is indistinguishable from noise."""
        g2, trace = self.grad_sq, self.trace
        if not (math.isfinite(g2) and math.isfinite(trace)):
            return math.nan
        return trace / g2 if g2 > 0 else math.inf

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "count": self.count, "g2": self._g2, "trace": self._trace}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = state["beta"]
        self.count = int(state["count"])
        self._g2 = float(state["g2"])
        self._trace = float(state["trace"])


def measure_grad_norms(
    model: nn.Module,
    loss_sum: Callable[[nn.Module, Any], Tensor],
    batches: Sequence[Any],
    units: Sequence[int],
    autocast: Callable[[], Any] | None = None,
) -> tuple[float, float]:
    """``(mean_j |g_j|^2, |mean_j g_j|^2)`` over equally sized small batches ``j``.

    ``g_j`` is batch j's mean gradient (its loss sum over its units); their mean is the gradient
    of the union. Leaves ``.grad`` cleared. Two host syncs per call, by design (it is a probe).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total: list[Tensor] | None = None
    sq_small = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for batch, n in zip(batches, units):
        for p in params:
            p.grad = None
        if autocast is not None:
            with autocast():
                loss = loss_sum(model, batch)
        else:
            loss = loss_sum(model, batch)
        (loss / n).backward()
        grads = [
            p.grad.detach().double()
            if p.grad is not None
            else torch.zeros_like(p, dtype=torch.float64)
            for p in params
        ]
        sq_small += sum((g * g).sum() for g in grads)
        total = grads if total is None else [t + g for t, g in zip(total, grads)]
    for p in params:
        p.grad = None
    k = len(batches)
    big = sum(((t / k) ** 2).sum() for t in total)
    return float(sq_small) / k, float(big)


def draw_iid(workload: Workload, gen: torch.Generator, size: int) -> tuple[Any, int]:
    """A batch of ``size`` training samples drawn independently with replacement: the i.i.d.
    sampling the estimators assume (not the run's sampler, whose order it must not disturb)."""
    idx = torch.randint(0, workload.n_train, (size,), generator=gen)
    batch = workload.batch(idx)
    return batch, workload.units(batch)


class NoiseProbe:
    """``B_simple`` measured every ``every`` optimizer steps, at the trainer's current weights.

    A measurement costs ``k`` extra forward/backward passes of ``b_small`` samples (default: an
    eighth of the current batch), drawn with the probe's own generator, and clears ``.grad``
    afterwards; it changes no weight, optimizer state or RNG stream of the run. The EMA over
    measurements, the generator and the last measured step are its state (checkpointed with the
    run, so a resumed run measures as an uninterrupted one). Measurements are appended to
    ``noise_scale.jsonl`` in the run directory by rank 0.
    """

    def __init__(
        self,
        every: int = 100,
        b_small: int | None = None,
        k: int = 8,
        beta: float = 0.9,
        seed: int = 0,
    ) -> None:
        if every < 1 or k < 2:
            raise ValueError(f"noise scale monitor: need every >= 1 and k >= 2, got {every}, {k}")
        self.every, self.b_small, self.k = every, b_small, k
        self.estimator = NoiseScaleEstimator(beta)
        self.rows: list[dict[str, float]] = []
        self.gen = torch.Generator().manual_seed(seed + 7919)
        self.last = -1

    def due(self, step: int) -> bool:
        return step % self.every == 0 and step != self.last

    def measure(
        self,
        workload: Workload,
        batch_size: int,
        step: int,
        autocast: Callable[[], Any] | None = None,
    ) -> dict[str, float]:
        """One measurement after ``step``; returns its row (also kept in ``self.rows``)."""
        self.last = step
        size = self.b_small or max(1, batch_size // 8)
        with rng_preserved():  # dropout in the probe's forwards draws from them
            drawn = [draw_iid(workload, self.gen, size) for _ in range(self.k)]
            g2s, g2b = measure_grad_norms(
                workload.model,
                workload.loss_sum,
                [b for b, _ in drawn],
                [u for _, u in drawn],
                autocast=autocast,
            )
        self.estimator.update(g2s, g2b, size, size * self.k)
        row = {
            "step": step,
            "noise_scale": self.estimator.b_simple,
            "grad_sq": self.estimator.grad_sq,
            "grad_trace": self.estimator.trace,
        }
        self.rows.append(row)
        return row

    def observe(self, trainer: TrainerView) -> dict[str, float] | None:
        """Measure when due after the trainer's current step, log the row into that step's
        metrics and append it to ``noise_scale.jsonl``; None when no measurement was due. The
        one path both the observing monitor and the loop's batch decision go through."""
        step = int(trainer.state.step)
        if not self.due(step):
            return None
        row = self.measure(trainer.workload, trainer.batch_size(), step, trainer.autocast)
        trainer.log_metrics({k: v for k, v in row.items() if k != "step"})
        self.write(row, trainer.run_dir, trainer.world)
        return row

    def write(self, row: dict[str, float], run_dir: Path | None, world: World) -> None:
        if run_dir is not None and world.is_main:
            with open(Path(run_dir) / "noise_scale.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def keep_until(self, step: int, run_dir: Path | None, world: World) -> None:
        """Drop measurements after ``step`` (a resumed or rolled-back run measures them again),
        so noise_scale.jsonl never holds a step twice."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        path = Path(run_dir) / "noise_scale.jsonl" if run_dir else None
        if path is None or not world.is_main or not path.exists():
            return
        lines = [x for x in path.read_text().splitlines() if x.strip()]
        kept = [x for x in lines if json.loads(x)["step"] <= step]
        if kept != lines:
            atomic_write_text(path, "".join(x + "\n" for x in kept))

    def state_dict(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator.state_dict(),
            "last": self.last,
            "generator": self.gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.estimator.load_state_dict(state["estimator"])
        self.last = int(state["last"])
        if "generator" in state:
            self.gen.set_state(state["generator"])
