"""The training loop. It fits on one screen; each line calls one decision of the Trainer."""

from __future__ import annotations

from typing import Any

from cadence.training.step import train_step
from cadence.training.trainer import Trainer


def fit(trainer: Trainer) -> dict[str, Any]:
    """Train until a budget, the target, early stopping, convergence or a signal ends the run."""
    t, cfg = trainer, trainer.cfg.train
    t.model.train()
    t.emit("on_start")
    t.start_clock()
    t.check_progress_budgets()  # a resumed run may already be at its budget
    while not t.stopping:
        size = t.batch_size()
        micro_batches, units = t.next_batches(size)
        lr = t.apply_lr()
        loss, grad_norm, stepped = train_step(
            t.step_model,
            t.optimizer,
            t.workload.loss_sum,
            micro_batches,
            units,
            clip_grad_norm=cfg.clip_grad_norm,
            autocast=t.autocast,
            params=t.params,
            world=t.world,
        )
        if not stepped:
            t.handle_nonfinite(size)
            continue
        t.advance(size)
        t.check_budgets(loss, grad_norm)
        t.check_signals()
        final = t.stopping and not t.interrupted
        metrics = t.evaluate() if t.due(cfg.eval_every) or final else None
        if metrics is not None or t.due(cfg.log_every) or final:
            t.log(loss, grad_norm, lr, size, metrics)
        if t.due(cfg.checkpoint_every) or t.stopping:
            t.save_checkpoint()
    if t.state.consecutive_skips:
        t.save_checkpoint()  # stopped on a non-finite step: keep the last good state
    summary = t.summary()
    t.emit("on_end", summary)
    return summary
