"""The gradient noise scale (McCandlish et al., 2018) and the critical batch size it predicts.

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
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cadence.io import atomic_write_text
from cadence.runtime.events import Callback

if TYPE_CHECKING:
    from cadence.config import Config
    from cadence.workloads import Workload

__all__ = [
    "AutoBatch",
    "NoiseScaleEstimate",
    "NoiseScaleEstimator",
    "NoiseScaleMonitor",
    "batch_controllers",
    "estimate_noise_scale",
    "lr_for_batch",
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


def _draw(cfg: Config, workload: Workload, gen: torch.Generator, size: int) -> tuple[Any, int]:
    # Independent draws with replacement: the i.i.d. sampling the estimators assume.
    idx = torch.randint(0, workload.n_train, (size,), generator=gen)
    batch = workload.batch(idx)
    return batch, workload.units(batch)


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
    base = workload.n_train if cfg.batch.size == "full" else int(cfg.batch.size)
    small = b_small or max(1, base // 8)
    big = b_big or small * 16
    if small < 1 or big <= small or big % small:
        raise ValueError(
            f"noise scale: the big batch must be a multiple > 1 of the small one, got {small}, {big}"
        )
    if measurements < 1:
        raise ValueError(f"noise scale: need at least 1 measurement, got {measurements}")
    if train_steps > 0:
        _train_first(cfg, workload, train_steps)
    model = workload.model
    model.train()
    gen = torch.Generator().manual_seed(cfg.train.seed if seed is None else seed)
    est = NoiseScaleEstimator(beta=None)
    history: list[float] = []
    t0 = time.perf_counter()
    k = big // small
    for m in range(measurements):
        drawn = [_draw(cfg, workload, gen, small) for _ in range(k)]
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


def _train_first(cfg: Config, workload: Workload, steps: int) -> None:
    """Run the real trainer for ``steps`` steps (no run directory, no progress bar)."""
    from cadence.training import Trainer, fit

    t = dataclasses.replace(
        cfg.train, max_steps=steps, eval_every=steps, progress=False, checkpoint_every=None
    )
    cfg = dataclasses.replace(cfg, train=t)
    fit(Trainer(cfg, workload, batch_controllers(cfg)))


class NoiseScaleMonitor(Callback):
    """Measure ``B_simple`` every ``every`` steps during training (``train.log_noise_scale``).

    An ordinary callback: after every ``every``-th optimizer step it costs ``k`` extra
    forward/backward passes of ``b_small`` samples, drawn with its own generator, and clears
    ``.grad`` afterwards; it changes no weight, optimizer state or RNG stream of the run. Each
    measurement goes into that step's metrics row (``trainer.log_metrics``: the step is logged),
    into ``self.rows`` and, when the trainer has a run directory, into ``noise_scale.jsonl``
    there (one JSON object per measurement, written by rank 0). Its estimator and generator are
    checkpointed with the run (``state_key``), so a resumed run measures as an uninterrupted one.
    """

    state_key = "noise_scale"

    def __init__(
        self, every: int = 100, b_small: int | None = None, k: int = 8, beta: float = 0.9
    ) -> None:
        if every < 1 or k < 2:
            raise ValueError(f"noise scale monitor: need every >= 1 and k >= 2, got {every}, {k}")
        self.every, self.b_small, self.k = every, b_small, k
        self.estimator = NoiseScaleEstimator(beta)
        self.rows: list[dict[str, float]] = []
        self._gen: torch.Generator | None = None
        self._last = -1

    def on_start(self, trainer: Any) -> None:
        if self._gen is None:  # a resumed run brought its generator back with load_state_dict
            self._gen = torch.Generator().manual_seed(trainer.cfg.train.seed + 7919)
        self._keep_until(trainer, trainer.state.step)

    def on_rewind(self, trainer: Any, step: int) -> None:
        self._keep_until(trainer, step)  # the checkpoint brought the estimator back to `step`

    def _keep_until(self, trainer: Any, step: int) -> None:
        """Drop measurements after `step` (a resumed or rolled-back run measures them again),
        so noise_scale.jsonl never holds a step twice."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        path = Path(trainer.run_dir) / "noise_scale.jsonl" if trainer.run_dir else None
        if path is None or not trainer.world.is_main or not path.exists():
            return
        lines = [x for x in path.read_text().splitlines() if x.strip()]
        kept = [x for x in lines if json.loads(x)["step"] <= step]
        if kept != lines:
            atomic_write_text(path, "".join(x + "\n" for x in kept))

    def on_step(self, trainer: Any) -> None:
        step = int(trainer.state.step)
        if step % self.every or step == self._last:
            return
        self._last = step
        row = self.measure(trainer, step)
        self.rows.append(row)
        trainer.log_metrics({k: v for k, v in row.items() if k != "step"})
        if trainer.run_dir is not None and trainer.world.is_main:
            with open(Path(trainer.run_dir) / "noise_scale.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def measure(self, trainer: Any, step: int) -> dict[str, float]:
        cfg, w = trainer.cfg, trainer.workload
        size = self.b_small or max(1, trainer.batch_size() // 8)
        rng = torch.get_rng_state()
        try:
            assert self._gen is not None
            drawn = [_draw(cfg, w, self._gen, size) for _ in range(self.k)]
            g2s, g2b = measure_grad_norms(
                w.model,
                w.loss_sum,
                [b for b, _ in drawn],
                [u for _, u in drawn],
                autocast=trainer.autocast,
            )
        finally:
            torch.set_rng_state(rng)
        self.estimator.update(g2s, g2b, size, size * self.k)
        return {
            "step": step,
            "noise_scale": self.estimator.b_simple,
            "grad_sq": self.estimator.grad_sq,
            "grad_trace": self.estimator.trace,
        }

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"estimator": self.estimator.state_dict(), "last": self._last}
        if self._gen is not None:
            state["generator"] = self._gen.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.estimator.load_state_dict(state["estimator"])
        self._last = int(state["last"])
        if "generator" in state:
            self._gen = torch.Generator().manual_seed(0)
            self._gen.set_state(state["generator"])


class AutoBatch(NoiseScaleMonitor):
    """``batch.schedule: auto``: the noise-scale monitor, whose measurements grow the batch.

    After each measurement the trainer's :class:`~cadence.schedules.AutoBatchRamp` is asked
    whether the critical batch (the EMA of ``B_simple``) calls for a bigger batch; a decision
    takes effect from the next step, goes into that step's row (``batch_target``, next to the
    ``noise_scale`` that made it) and into the checkpoint with the monitor's own state. The
    first two measurements only warm the EMA up. Under torch.distributed rank 0's decision is
    broadcast, so every rank takes the same batch even where their estimates differ in the
    last bits.
    """

    state_key = "auto_batch"
    warmup_measurements = 2

    def __init__(self, every: int = 100, **kw: Any) -> None:
        super().__init__(every=every, **kw)
        self.ramp: Any = None  # the trainer's AutoBatchRamp, from on_start
        self._decisions: list[tuple[int, int]] | None = None  # loaded before on_start

    def on_start(self, trainer: Any) -> None:
        self.ramp = trainer.ramp
        if self._decisions is not None:
            self.ramp.decisions = self._decisions
        super().on_start(trainer)

    def on_step(self, trainer: Any) -> None:
        step = int(trainer.state.step)
        measured = not (step % self.every or step == self._last)
        super().on_step(trainer)
        if not measured or self.estimator.count < self.warmup_measurements:
            return
        size = self.ramp.propose(step, self.estimator.b_simple)
        if trainer.world.active:
            from cadence.runtime.distributed import broadcast_object

            size = broadcast_object(size, trainer.world)
        if size is not None:
            self.ramp.grow(step, size)
            trainer.log_metrics({"batch_target": size})

    def state_dict(self) -> dict[str, Any]:
        decisions = self.ramp.decisions if self.ramp is not None else self._decisions or []
        return {**super().state_dict(), "decisions": [list(d) for d in decisions]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._decisions = [(int(a), int(b)) for a, b in state["decisions"]]
        if self.ramp is not None:  # a rollback mid-run
            self.ramp.decisions = list(self._decisions)


def batch_controllers(cfg: Config) -> list[Callback]:
    """The callbacks a trainer for ``cfg`` needs to decide its batch (``batch.schedule: auto``)."""
    if cfg.batch.schedule != "auto":
        return []
    return [AutoBatch(every=cfg.train.noise_scale_every or cfg.train.eval_every)]
