"""The training loop. It fits on one screen; each line calls one decision of the Trainer."""

from __future__ import annotations

from typing import Any

from cadence.training.trainer import Trainer


def fit(trainer: Trainer) -> dict[str, Any]:
    """Train until a budget, the target, early stopping, convergence or a signal ends the run."""
    t, cfg = trainer, trainer.cfg.train
    t.model.train()
    t.emit("on_start")
    t.clock.start()
    t.check_budgets()  # a resumed run may already be at its budget
    try:
        while not t.stopping:
            size = t.batch_size()
            micro_batches, units = t.next_batches(size)
            lr = t.apply_lr()
            with t.watching():  # train.inspect_every: per-layer hooks on an inspected step
                loss, grad_norm = t.backward(micro_batches, units)
            read = t.read(loss, grad_norm)  # the step's one host read (and one all-reduce)
            if not read.finite:
                t.handle_nonfinite(size)  # the update is not applied
                continue
            if t.handle_spike(read, size):  # train.on_spike: skip, or roll back past the data
                continue
            t.update()  # the optimizer step (measured per layer on an inspected step)
            t.advance(size, read)  # the counters, and the time the schedules follow
            t.decide_batch()  # batch.schedule: auto: the measured noise scale may grow the batch
            t.measure_sharpness()  # train.sharpness_every: the loss Hessian's top eigenvalue
            t.emit("on_step")
            t.check_stops(read)
            final = t.stopping and not t.interrupted
            metrics = t.evaluate() if t.due(cfg.eval_every) or final else None
            if metrics is not None or t.pending or t.due(cfg.log_every) or final:
                t.log(read, lr, size, metrics)
            if t.due(cfg.checkpoint_every) or t.stopping:
                t.save_checkpoint()
    finally:
        t.close()
    if t.state.consecutive_skips:
        t.save_checkpoint()  # stopped on a non-finite step: keep the last good state
    summary = t.summary()
    t.emit("on_end", summary)
    return summary
