"""Logging: one metrics row per logged step, built from host numbers the step already read,
and the run's summary.

A row holds the contract's keys (step, samples, lr, batch_size, train_loss, grad_norm, time_s,
and tokens for text) plus throughput over the interval since the previous row and whatever the
evaluation and callbacks recorded for this step. Nothing here touches the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from cadence.schedules import EMASmoother

if TYPE_CHECKING:
    from cadence.config import Config
    from cadence.training.state import TrainState
    from cadence.workloads import Workload


class RowLogger:
    """Builds rows and keeps what they need between logs: the smoothed training loss (read by
    the plateau controller with ``plateau.monitor: train_loss``) and the throughput window."""

    def __init__(self, n_train: int, tokens_per_sample: int) -> None:
        self.n_train = n_train
        self.tokens_per_sample = tokens_per_sample
        self.smoother = EMASmoother(0.9)
        self._last = (0.0, 0, 0)  # (train time, samples, tokens) at the previous row

    def row(
        self,
        st: TrainState,
        *,
        loss: float,
        grad_norm: float,
        lr: float,
        batch_size: int,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        st.last_train_loss = loss
        if math.isfinite(loss):
            self.smoother.update(loss)
        t0, s0, k0 = self._last
        dt = max(st.train_time_s - t0, 1e-9)
        row: dict[str, Any] = {
            "step": st.step,
            "samples": st.samples,
            "epoch": st.samples / self.n_train,
            "lr": lr,
            "batch_size": batch_size,
            "train_loss": loss,
            "grad_norm": grad_norm,
            "time_s": st.elapsed_s,
            "train_time_s": st.train_time_s,
            "train_cpu_s": st.train_cpu_s,
            "samples_per_s": (st.samples - s0) / dt,
        }
        if self.tokens_per_sample:
            row["tokens"] = st.tokens
            row["tokens_per_s"] = (st.tokens - k0) / dt
        if st.skipped_steps:
            row["skipped_steps"] = st.skipped_steps
        if st.rollbacks:
            row["rollbacks"] = st.rollbacks
        row.update(extra)
        self._last = (st.train_time_s, st.samples, st.tokens)
        return row


def run_summary(
    cfg: Config,
    workload: Workload,
    st: TrainState,
    last_metrics: dict[str, float] | None,
    params: Sequence[Tensor],
    target: float | None,
) -> dict[str, Any]:
    """What summary.json holds: final and best results, budgets spent, speed, the stop."""
    train = max(st.train_time_s, 1e-9)
    reason = st.stop_reason
    flops_fn = getattr(workload.model, "flops_per_token", None)
    flops = float(flops_fn()) if callable(flops_fn) else None
    return {
        "workload": workload.name,
        "optimizer": cfg.optimizer.name,
        "schedule": cfg.schedule.name,
        "metric": workload.metric,
        "higher_is_better": workload.higher_is_better,
        "final_train_loss": st.last_train_loss,
        "final_metrics": last_metrics,
        "best_metric": st.best_metric,
        "best_step": st.best_step,
        "best_val_loss": st.best_val_loss,
        "target": target,
        "target_step": st.target_step,
        "steps": st.step,
        "samples": st.samples,
        "tokens": st.tokens,
        "wall_time_s": st.elapsed_s,
        "train_time_s": st.train_time_s,
        "eval_time_s": st.eval_time_s,
        "checkpoint_time_s": st.checkpoint_time_s,
        "cpu_time_s": st.cpu_s,
        "train_cpu_s": st.train_cpu_s,
        "samples_per_s": st.samples / train,  # per second of training (no eval/checkpoints)
        "tokens_per_s": st.tokens / train,
        # the whole model's, and the ones this run trained (adapters only under model.peft)
        # (parameters() yields a tied weight once; the trainer's params come from it)
        "params": sum(p.numel() for p in workload.model.parameters()),
        "trainable_params": sum(p.numel() for p in params),
        # Model FLOPs (6N + attention, see GPT.flops_per_token) and their rate: MFU's numerator.
        "flops_per_token": flops,
        "model_flops_per_s": None if flops is None else flops * st.tokens / train,
        "spikes": st.spikes,  # train.on_spike: each spike, what was done, the layer named
        "stop_reason": None if reason is None else str(reason),
        "stop": None if reason is None else reason.to_dict(),
    }
