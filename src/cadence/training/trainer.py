"""The trainer's parts, assembled from a config: optimizer, schedules, data order, run control.

`fit()` in loop.py reads top to bottom on one screen; everything it calls lives here so that each
decision (the LR of a step, which samples it sees, when to evaluate or stop) is one small method.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cadence.config import ConfigError
from cadence.data import EpochSampler
from cadence.optim import is_schedule_free, set_train_mode
from cadence.schedules import EMASmoother, split_micro
from cadence.training import distributed
from cadence.training.checkpoint import agreed, latest_valid, restore, save_checkpoint
from cadence.training.components import (
    batch_ramp_from,
    lr_schedule_from,
    optimizer_from,
    plateau_from,
)
from cadence.training.distributed import SINGLE, World
from cadence.training.ema import EMA
from cadence.training.events import Callback
from cadence.training.state import TrainState
from cadence.training.step import autocast_context

if TYPE_CHECKING:
    from cadence.config import Config
    from cadence.workloads import Workload


class Trainer:
    def __init__(
        self,
        cfg: Config,
        workload: Workload,
        callbacks: Sequence[Callback] = (),
        run_dir: Path | None = None,
        world: World = SINGLE,
    ) -> None:
        self.cfg = cfg
        self.world = world
        self.run_dir = run_dir
        self.last_metrics: dict[str, float] | None = None
        self.workload = workload
        self.model = workload.model
        self.device = next(self.model.parameters()).device
        self.callbacks = list(callbacks)
        t = cfg.train
        # Wrapped before the optimizer is built: FSDP2 shards the parameters in place, and the
        # optimizer must hold the sharded ones.
        self.step_model = distributed.wrap(self.model, world, t.precision)
        self.optimizer = optimizer_from(cfg, self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.full_batch = cfg.batch.size == "full"
        self.ramp = batch_ramp_from(cfg, workload.n_train)
        self.schedule = lr_schedule_from(
            cfg, steps_per_epoch=max(1, math.ceil(workload.n_train / self.ramp.size_at(0)))
        )
        self.plateau = plateau_from(cfg) if cfg.plateau.enabled else None
        self.smoother = EMASmoother(0.9)
        self.ema = EMA(self.model, t.ema) if t.ema else None
        # Full-batch GD visits the training set in order, every sample once per step.
        self.sampler = EpochSampler(workload.n_train, t.seed, shuffle=not self.full_batch)
        self.state = TrainState()
        self.autocast = autocast_context(self.device, t.precision)
        if self.ramp.size_at(0) < world.size:
            raise ConfigError(
                f"batch.size: {self.ramp.size_at(0)} is smaller than the {world.size} processes; "
                "each process needs at least one sample"
            )
        if t.compile:
            self.step_model = torch.compile(self.step_model)
        self._clock = self._clock_base = 0.0
        self._last_log = (0.0, 0, 0)  # (train time, samples, tokens) at the previous log row
        self.signals = None  # a StopSignals while fit() runs under train()/resume()
        self.noise_scale = None
        if t.log_noise_scale:
            from cadence.tune.noise_scale import NoiseScaleMonitor

            self.noise_scale = NoiseScaleMonitor(every=t.noise_scale_every or t.eval_every)
            self.noise_scale.on_start(self)

    # ------------------------------------------------------------ per-step decisions

    def emit(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    def lr_multiplier(self, step: int) -> float:
        """warmup -> schedule, times the plateau factor, times the batch-ramp LR rule."""
        scale = self.plateau.scale if self.plateau is not None else 1.0
        return self.schedule(step) * scale * self.ramp.lr_scale_at(step) * self.state.lr_scale

    def apply_lr(self) -> float:
        mult = self.lr_multiplier(self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * mult
        return self.cfg.optimizer.lr * mult

    def batch_size(self) -> int:
        return self.ramp.size_at(self.state.step)

    def next_batches(self, size: int) -> tuple[list[Any], int]:
        """The micro-batches of the next global batch, taken at the current data position."""
        # Every rank draws the same global batch and keeps its share: the data order, and so the
        # run, do not depend on the number of processes.
        indices = distributed.shard(self.sampler.indices(self.state.samples, size), self.world)
        sizes = split_micro(len(indices), self.cfg.batch.micro_size)
        if self.world.active:
            # Every rank must run as many forward/backward passes as the one with the largest
            # share (DDP broadcasts buffers and FSDP2 gathers parameters in each forward): a
            # smaller share is padded with empty micro-batches, which add nothing to the loss.
            most = split_micro(-(-size // self.world.size), self.cfg.batch.micro_size)
            sizes += [0] * (len(most) - len(sizes))
        micro, start = [], 0
        for n in sizes:
            micro.append(self.workload.batch(indices[start : start + n]))
            start += n
        return micro, size * max(1, self.workload.tokens_per_sample)

    def advance(self, size: int) -> None:
        self.state.consecutive_skips = 0
        self.state.step += 1
        self.state.samples += size
        self.state.tokens += size * self.workload.tokens_per_sample
        if self.ema is not None:
            self.ema.update(self.model)
        st = self.state
        self._tick()
        # Time-to-target and throughput count training only: how often a run evaluates or
        # checkpoints (and how costly its evaluation is: EMA, schedule-free swaps) is not its speed.
        st.train_time_s = st.elapsed_s - st.eval_time_s - st.checkpoint_time_s

    def _tick(self) -> None:
        """Bring elapsed_s up to now (after a step, an evaluation or a checkpoint), so that
        elapsed_s - eval_time_s - checkpoint_time_s is training time also across a resume."""
        if self._clock == 0.0:  # evaluate() or save_checkpoint() called outside fit()
            return
        self.state.elapsed_s = self._clock_base + (time.perf_counter() - self._clock)

    def start_clock(self) -> None:
        self._clock_base = self.state.elapsed_s
        self._clock = time.perf_counter()

    def due(self, every: int | None) -> bool:
        return every is not None and self.state.step % every == 0

    @property
    def stopping(self) -> bool:
        return self.state.stop_reason is not None

    def stop(self, reason: str) -> None:
        if self.state.stop_reason is None:
            self.state.stop_reason = reason

    # ------------------------------------------------------------ stop criteria

    def check_budgets(self, loss: Tensor, grad_norm: Tensor) -> None:
        self.check_progress_budgets()
        t = self.cfg.train
        # Convergence criteria need the values every step: a host sync, paid only when asked for.
        if t.tol_grad_norm is not None and float(grad_norm) < t.tol_grad_norm:
            self.stop("converged_grad_norm")
        if t.tol_rel_loss is not None:
            cur = float(loss)
            prev, self.state.prev_loss = self.state.prev_loss, cur
            if prev is not None and abs(cur - prev) <= t.tol_rel_loss * max(abs(prev), 1e-12):
                self.stop("converged_loss")

    def check_progress_budgets(self) -> None:
        """Step, sample, token and time budgets. Also checked before the first step, so that
        resuming a run that already reached its budget trains nothing more."""
        t, st = self.cfg.train, self.state
        if st.step >= t.max_steps:
            self.stop("max_steps")
        if t.max_samples is not None and st.samples >= t.max_samples:
            self.stop("max_samples")
        if t.max_tokens is not None and st.tokens >= t.max_tokens:
            self.stop("max_tokens")
        if t.max_time_s is not None and distributed.any_rank(
            st.elapsed_s >= t.max_time_s, self.world
        ):
            self.stop("max_time")

    def _better(self, value: float, best: float | None) -> bool:
        if best is None:
            return math.isfinite(value)
        return value > best if self.workload.higher_is_better else value < best

    # ------------------------------------------------------------ evaluation

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Schedule-free: swap in the averaged weights (eval mode) for evaluation and saving.

        The train-mode weights are copied back bit for bit afterwards rather than recomputed by
        `optimizer.train()`, whose interpolation is not exactly invertible in floating point:
        the trajectory then does not depend on how often a run evaluates or checkpoints, which
        exact resume needs.
        """
        if not is_schedule_free(self.optimizer):
            yield
            return
        saved = [p.detach().clone() for p in self.params]
        set_train_mode(self.optimizer, False)
        try:
            yield
        finally:
            # FSDP2: drop the unsharded (averaged) root parameters the evaluation left behind, or
            # the next training forward would use them instead of the restored ones.
            distributed.reshard(self.model)
            set_train_mode(self.optimizer, True)
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def evaluate(self) -> dict[str, float]:
        """Validation metrics at the current step; updates target, best, early stop, plateau."""
        t0 = time.perf_counter()
        self.model.eval()
        with self.averaged_weights(), self.autocast():
            metrics = self.workload.evaluate(self.model, self.world)
            if self.ema is not None:
                with self.ema.applied(self.model):
                    ema_metrics = self.workload.evaluate(self.model, self.world)
                metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        self.model.train()
        self.last_metrics = metrics
        self.state.eval_time_s += time.perf_counter() - t0
        self._tick()

        st, t = self.state, self.cfg.train
        value = metrics[self.workload.metric]
        if self._better(value, st.best_metric):
            st.best_metric, st.best_step, st.evals_since_best = value, st.step, 0
        else:
            st.evals_since_best += 1
        vl = metrics.get("val_loss")
        if vl is not None and (st.best_val_loss is None or vl < st.best_val_loss):
            st.best_val_loss = vl
        if t.target is not None and st.target_step is None:
            hit = value >= t.target if self.workload.higher_is_better else value <= t.target
            if hit:
                st.target_step = st.step
                if t.stop_at_target:
                    self.stop("target")
        if t.early_stop_patience is not None and st.evals_since_best >= t.early_stop_patience:
            self.stop("early_stop")
        if self.plateau is not None:
            # Patience counts evaluations for either monitor; the training loss is the EMA of the
            # values read at log rows, so it is smoothed over the whole interval.
            use_val = self.cfg.plateau.monitor == "val_loss"
            monitor = vl if use_val else (self.smoother.value if self.smoother.count else None)
            if monitor is not None:
                self.plateau.update(monitor)
        self.emit("on_eval", metrics)
        return metrics

    # ------------------------------------------------------------ logging

    def log(
        self, loss: Tensor, grad_norm: Tensor, lr: float, size: int, metrics: dict | None
    ) -> dict[str, Any]:
        """Read the step's scalars back from the device (the only sync of a normal step)."""
        st = self.state
        train_loss, norm = float(loss), float(grad_norm)
        st.last_train_loss = train_loss
        if math.isfinite(train_loss):
            self.smoother.update(train_loss)
        t0, s0, k0 = self._last_log
        dt = max(st.train_time_s - t0, 1e-9)
        row: dict[str, Any] = {
            "step": st.step,
            "samples": st.samples,
            "epoch": st.samples / self.workload.n_train,
            "lr": lr,
            "batch_size": size,
            "train_loss": train_loss,
            "grad_norm": norm,
            "time_s": st.elapsed_s,
            "train_time_s": st.train_time_s,
            "samples_per_s": (st.samples - s0) / dt,
        }
        if self.workload.tokens_per_sample:
            row["tokens"] = st.tokens
            row["tokens_per_s"] = (st.tokens - k0) / dt
        if self.plateau is not None:
            row["plateau_scale"] = self.plateau.scale
        if st.skipped_steps:
            row["skipped_steps"] = st.skipped_steps
        if st.rollbacks:
            row["rollbacks"] = st.rollbacks
        if metrics:
            row.update(metrics)
        ns = self.noise_scale
        if ns is not None and st.step % ns.every == 0:
            # Extra forward/backward passes on batches of its own; weights and RNG untouched.
            row.update({k: v for k, v in ns.measure(self, st.step).items() if k != "step"})
        self._last_log = (st.train_time_s, st.samples, st.tokens)
        self.emit("on_log", row)
        return row

    # ------------------------------------------------------------ results

    def save_checkpoint(self) -> Path | None:
        if self.run_dir is None:
            return None
        t0 = time.perf_counter()
        path = save_checkpoint(
            self, self.run_dir / "checkpoints", keep_last=self.cfg.train.keep_checkpoints
        )
        self.state.checkpoint_time_s += time.perf_counter() - t0
        self._tick()
        if self.world.is_main:
            self.emit("on_checkpoint", str(path))
        return path

    # ------------------------------------------------------------ faults and signals

    MAX_CONSECUTIVE_SKIPS = 10
    MAX_ROLLBACKS = 5

    def check_signals(self) -> None:
        received = self.signals.received if self.signals is not None else None
        if self.world.active:
            # One tiny all-reduce a step, so every rank stops at the same step boundary.
            hit = distributed.any_rank(received is not None, self.world)
            received = (received or "SIGTERM") if hit else None
        if received:
            self.stop(f"interrupted ({received})")

    @property
    def interrupted(self) -> bool:
        return (self.state.stop_reason or "").startswith("interrupted")

    def handle_nonfinite(self, size: int) -> None:
        """A step whose loss or gradient was not finite; its update was not applied.

        `stop` ends the run at the last good state (the checkpoint written on stopping holds
        it); `skip` moves past the batch without an update; `rollback` reloads the newest valid
        checkpoint and lowers the LR by `train.rollback_lr_factor`.
        """
        st, policy = self.state, self.cfg.train.on_nonfinite
        bad_step = st.step + 1
        st.skipped_steps += 1
        st.consecutive_skips += 1
        if policy == "stop":
            self.stop(f"nonfinite at step {bad_step}")
        elif policy == "skip":
            st.samples += size  # drop this batch, keep the data order of the run
            st.tokens += size * self.workload.tokens_per_sample
            if st.consecutive_skips >= self.MAX_CONSECUTIVE_SKIPS:
                self.stop(f"nonfinite at step {bad_step}: {st.consecutive_skips} steps in a row")
        else:
            self.rollback(bad_step)

    def rollback(self, bad_step: int) -> None:
        path = None
        if self.run_dir is not None:
            root = self.run_dir / "checkpoints"
            path, _ = agreed(lambda: latest_valid(root), self.world)
        if path is None or self.state.rollbacks >= self.MAX_ROLLBACKS:
            why = "no checkpoint to roll back to" if path is None else "too many rollbacks"
            self.stop(f"nonfinite at step {bad_step}: {why}")
            return
        kept = (self.state.rollbacks + 1, self.state.lr_scale, self.state.skipped_steps)
        restore(self, path, verified=True)
        st = self.state
        st.rollbacks, st.skipped_steps = kept[0], kept[2]
        st.lr_scale = kept[1] * self.cfg.train.rollback_lr_factor
        self.emit("on_rewind", st.step)

    def summary(self) -> dict[str, Any]:
        st, w = self.state, self.workload
        train = max(st.train_time_s, 1e-9)
        return {
            "workload": w.name,
            "optimizer": self.cfg.optimizer.name,
            "schedule": self.cfg.schedule.name,
            "metric": w.metric,
            "higher_is_better": w.higher_is_better,
            "final_train_loss": st.last_train_loss,
            "final_metrics": self.last_metrics,
            "best_metric": st.best_metric,
            "best_step": st.best_step,
            "best_val_loss": st.best_val_loss,
            "target": self.cfg.train.target,
            "target_step": st.target_step,
            "steps": st.step,
            "samples": st.samples,
            "tokens": st.tokens,
            "wall_time_s": st.elapsed_s,
            "train_time_s": st.train_time_s,
            "eval_time_s": st.eval_time_s,
            "checkpoint_time_s": st.checkpoint_time_s,
            "samples_per_s": st.samples / train,  # per second of training (no eval/checkpoints)
            "tokens_per_s": st.tokens / train,
            "params": sum(p.numel() for p in self.params),
            "stop_reason": st.stop_reason,
        }
