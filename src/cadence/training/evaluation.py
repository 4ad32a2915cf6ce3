"""Evaluation and its bookkeeping: the weights worth scoring, and what a score changes.

`averaged_weights` and `validation_metrics` produce the numbers; `record_evaluation` is the
bookkeeping (best metric, best validation loss, the step the target was first reached,
evaluations since the best) as a plain function of the run's state, returning the stop it
implies, so a custom loop gets the same target and early-stopping rules as the Trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cadence.optim import is_schedule_free, set_train_mode
from cadence.runtime import distributed
from cadence.training.stopping import (
    StopKind,
    StopReason,
    early_stop_due,
    is_better,
    target_reached,
)

if TYPE_CHECKING:
    from cadence.config import TrainConfig
    from cadence.optim import AnyOptimizer
    from cadence.runtime.distributed import World
    from cadence.schedules import EMASmoother, Plateau
    from cadence.training.ema import EMA
    from cadence.training.state import TrainState
    from cadence.workloads import Workload


@contextlib.contextmanager
def averaged_weights(
    model: nn.Module, optimizer: AnyOptimizer, params: Sequence[Tensor]
) -> Iterator[None]:
    """Schedule-free: swap in the averaged weights (eval mode) for evaluation and saving.

    The train-mode weights are copied back bit for bit afterwards rather than recomputed by
    `optimizer.train()`, whose interpolation is not exactly invertible in floating point:
    the trajectory then does not depend on how often a run evaluates or checkpoints, which
    exact resume needs.
    """
    if not is_schedule_free(optimizer):
        yield
        return
    saved = [p.detach().clone() for p in params]
    set_train_mode(optimizer, False)
    try:
        yield
    finally:
        # FSDP2: drop the unsharded (averaged) root parameters the evaluation left behind, or
        # the next training forward would use them instead of the restored ones.
        distributed.reshard(model)
        set_train_mode(optimizer, True)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def validation_metrics(
    workload: Workload,
    world: World,
    autocast: Callable[[], Any],
    ema: EMA | None = None,
) -> dict[str, float]:
    """The workload's metrics on the current weights (the caller swaps in averaged ones), and
    the EMA weights' as ``ema_*``. Leaves the model in train mode."""
    model = workload.model
    model.eval()
    try:
        with autocast():
            metrics = workload.evaluate(model, world)
            if ema is not None:
                with ema.applied(model):
                    ema_metrics = workload.evaluate(model, world)
                metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
    finally:
        model.train()
    return metrics


def record_evaluation(
    st: TrainState,
    metrics: dict[str, float],
    *,
    metric: str,
    higher_is_better: bool,
    train: TrainConfig,
    target: float | None = None,
) -> StopReason | None:
    """Update the best-metric records of `st` with one evaluation; the stop it calls for.

    `target` is the metric value to reach (``train.target``, or the workload's own)."""
    value = metrics[metric]
    if is_better(value, st.best_metric, higher_is_better):
        st.best_metric, st.best_step, st.evals_since_best = value, st.step, 0
    else:
        st.evals_since_best += 1
    vl = metrics.get("val_loss")
    if vl is not None and (st.best_val_loss is None or vl < st.best_val_loss):
        st.best_val_loss = vl
    stop = None
    if st.target_step is None and target_reached(value, target, higher_is_better):
        st.target_step = st.step
        if train.stop_at_target:
            stop = StopReason(StopKind.TARGET)
    if stop is None and early_stop_due(st.evals_since_best, train.early_stop_patience):
        stop = StopReason(StopKind.EARLY_STOP)
    return stop


def update_plateau(
    plateau: Plateau, monitor: str, metrics: dict[str, float], smoother: EMASmoother
) -> None:
    """One evaluation's worth of the loss-driven LR rule. Patience counts evaluations for
    either monitor; the training loss is the EMA of the values read at log rows, so it is
    smoothed over the whole interval."""
    if monitor == "val_loss":
        value = metrics.get("val_loss")
    else:
        value = smoother.value if smoother.count else None
    if value is not None:
        plateau.update(value)
