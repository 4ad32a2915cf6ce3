"""The Trainer: the run's parts assembled from a config, and one small method per decision.

`fit()` in loop.py reads top to bottom on one screen and calls these. Each concern lives in its
own module as plain functions a custom loop can use too: stopping rules (stopping.py), the
non-finite policy (nonfinite.py), evaluation bookkeeping (evaluation.py), metrics rows
(rows.py), the step and its one host read (step.py), which samples a step sees (batches.py),
what the schedules say for a step (scheduled.py), laid out over the run's horizon
(``cadence.config.horizon``: the step at which its first budget ends).
Checkpoints go through `state_dict()` / `load_state_dict()` and the weight methods of
checkpointable.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cadence.config import ConfigError
from cadence.config.parts import (
    batch_ramp_from,
    hparam_schedules_from,
    lr_schedule_from,
    optimizer_from,
    plateau_from,
    seq_len_schedule_from,
)
from cadence.config.validate import check_horizon
from cadence.runtime import distributed
from cadence.runtime.distributed import SINGLE, World
from cadence.runtime.events import Callback
from cadence.schedules import AutoBatchRamp
from cadence.training import evaluation
from cadence.training.async_save import BackgroundWriter
from cadence.training.batches import Prefetcher, cut_to_length, global_batch, trained_tokens
from cadence.training.checkpointable import Checkpointable
from cadence.training.compiling import Compiler
from cadence.training.ema import EMA
from cadence.training.guards import Guards
from cadence.training.health import InspectDecisions, LayerHealth, SharpnessProbe
from cadence.training.noise import NoiseProbe
from cadence.training.privacy import private_gradients
from cadence.training.rows import RowLogger, run_summary
from cadence.training.scheduled import ScheduledReads
from cadence.training.state import RunClock, TrainState
from cadence.training.step import StepRead, autocast_context, backward_step, read_step
from cadence.training.stopping import StopDecisions, time_up
from cadence.workloads.tensors import NextTokenLoss

if TYPE_CHECKING:
    from cadence.config import Config
    from cadence.workloads import Workload

AUTO_BATCH_WARMUP = 2  # measurements of the noise scale before batch.schedule: auto decides


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """``train.activation_checkpointing`` for a model that supports it (cadence's GPT)."""
    setter = getattr(model, "set_activation_checkpointing", None)
    if setter is None:
        raise ConfigError(
            f"train.activation_checkpointing: {type(model).__name__} has no blocks to "
            "checkpoint (cadence's GPT has); set it to false"
        )
    setter(True)


def _check_batches(ramp: Any, seq_len: Any, workload: Workload, world: World) -> None:
    """What a batch needs that only the built parts know: one sample per process, token
    sequences to shorten."""
    if ramp.size_at(0) < world.size:
        raise ConfigError(
            f"batch.size: {ramp.size_at(0)} is smaller than the {world.size} processes; "
            "each process needs at least one sample"
        )
    if seq_len is not None and not isinstance(workload, NextTokenLoss):
        raise ConfigError(
            "schedule.seq_len: this workload's batches are not (inputs, targets) token "
            "sequences; remove schedule.seq_len"
        )


class Trainer(Checkpointable, StopDecisions, ScheduledReads, Guards, InspectDecisions):
    def __init__(
        self,
        cfg: Config,
        workload: Workload,
        callbacks: Sequence[Callback] = (),
        run_dir: Path | None = None,
        world: World = SINGLE,
    ) -> None:
        for key, value in (
            ("batch.size", cfg.batch.size),
            ("schedule.warmup", cfg.schedule.warmup),
        ):
            if value == "auto":
                raise ConfigError(
                    f"{key}: auto is decided before training, by the pilot of cadence.train "
                    "(cadence.tune.choose_auto); give the Trainer the decided config"
                )
        self.cfg, self.world, self.run_dir, self.workload = cfg, world, run_dir, workload
        self.model = workload.model
        self.device = next(self.model.parameters()).device
        self.callbacks = list(callbacks)
        t = cfg.train
        if t.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        # Wrapped before the optimizer is built: FSDP2 shards the parameters in place, and the
        # optimizer must hold the sharded ones.
        wrapped = distributed.wrap(self.model, world, t.precision)
        self.optimizer = optimizer_from(cfg, self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # the step at which the first budget ends: every schedule is laid out over it
        self.horizon = check_horizon(cfg, workload.n_train, workload.tokens_per_sample)
        steps = self.horizon.steps
        self.ramp = batch_ramp_from(cfg, workload.n_train, steps)
        # batch.schedule: auto decides from the noise scale this probe measures (decide_batch)
        every = t.noise_scale_every or t.eval_every
        auto = isinstance(self.ramp, AutoBatchRamp)
        self.noise = NoiseProbe(every, seed=t.seed) if auto else None
        epoch = max(1, math.ceil(workload.n_train / self.ramp.size_at(0)))
        self.schedule = lr_schedule_from(cfg, epoch, steps)
        self.hparams = hparam_schedules_from(cfg, steps)
        self.scheduled: dict[str, float] = {}  # this step's momentum / weight decay, for its row
        self.seq_len = seq_len_schedule_from(cfg, steps)
        self.plateau = plateau_from(cfg) if cfg.plateau.enabled else None
        self.ema = EMA(self.model, t.ema) if t.ema else None
        every = t.inspect_every  # per-layer health (inspect.jsonl), read by callbacks
        self.health = LayerHealth(self.model, every, world) if every else None
        self.inspection: dict[str, Any] | None = None  # this step's record, if inspected
        self.sharpness = SharpnessProbe(t.sharpness_every) if t.sharpness_every else None
        # Full-batch GD visits the training set in order, every sample once per step.
        self.sampler = workload.sampler(t.seed, shuffle=cfg.batch.size != "full")
        self.privacy = private_gradients(cfg, self.optimizer, workload, steps, world)  # DP-SGD
        self.state = TrainState()
        self.clock = RunClock(self.state)
        self.rows = RowLogger(workload.n_train, workload.tokens_per_sample)
        self.autocast = autocast_context(self.device, t.precision)
        self.sharded = t.distributed == "fsdp"  # FSDP runs save sharded (DCP) checkpoints
        self.writer = BackgroundWriter() if t.async_checkpoint else None  # checkpoints' thread
        self.last_metrics: dict[str, float] | None = None
        self.pending: dict[str, Any] = {}  # what callbacks logged for this step's row
        self.signals = None  # a StopSignals while fit() runs under cadence.train / resume
        # train.target, or the workload's own target when the config leaves it null
        self.target = t.target if t.target is not None else workload.target
        on = workload.prefetch and self.device.type == "cuda" if t.prefetch is None else t.prefetch
        on = on and self.privacy is None  # a private step's batch is a draw, not a position
        self.prefetcher = Prefetcher(self._read_batches, self.device) if on else None
        _check_batches(self.ramp, self.seq_len, workload, world)
        # per-example hooks run eagerly; Hessian-vector products need eager blocks
        compile_ = False if self.privacy is not None or t.sharpness_every else t.compile
        self.compiler = Compiler(compile_, self.model, wrapped, self.device, steps, self.sharded)

    # ------------------------------------------------------------ events

    def emit(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    def log_metrics(self, values: dict[str, Any]) -> None:
        """Add values to this step's metrics row (and make the step a logged one)."""
        self.pending.update(values)

    # ------------------------------------------------------------ per-step decisions

    def decide_batch(self) -> None:
        """batch.schedule: auto. After each measurement of the noise scale, grow the batch when
        the critical batch (the measurements' EMA) is at least twice it; the first
        AUTO_BATCH_WARMUP measurements only warm the EMA up. Rank 0's decision holds on every
        rank, so all take the same batch where their estimates differ in the last bits."""
        probe = self.noise
        if probe is None or probe.observe(self) is None:
            return
        if probe.estimator.count < AUTO_BATCH_WARMUP:
            return
        step = self.state.step
        size = distributed.broadcast_object(
            self.ramp.propose(step, probe.estimator.b_simple), self.world
        )
        if size is not None:
            self.ramp.grow(step, size)  # takes effect from the next step
            self.log_metrics({"batch_target": size})

    def next_batches(self, size: int) -> tuple[list[Any], int]:
        """The micro-batches of the next global batch, taken at the current data position
        (privacy.enabled: the step's Poisson draw)."""
        if self.privacy is not None:
            return self.privacy.batches(self.state.step, self.micro_size)
        self.skip_data()  # train.skip_samples, or the window a spike's rollback skips
        if self.prefetcher is None:
            micro, units = self._read_batches(self.state.samples, size)
        else:
            following = self.ramp.size_at(self.position + 1)
            micro, units = self.prefetcher.get(self.state.samples, size, following)
        # Shortened after the read, so which samples a step sees (and the prefetch) is the
        # same with and without the warmup.
        return cut_to_length(micro, units, self.seq_len, self.position)

    def backward(self, micro_batches: list[Any], units: int) -> tuple[Tensor, Tensor]:
        """Forward and backward of a global batch: (loss, grad norm), on the device."""
        if self.privacy is not None:
            return self.privacy.backward(micro_batches, units, self.state.step)

        def step(module: torch.nn.Module) -> tuple[Tensor, Tensor]:
            return backward_step(
                module,
                self.optimizer,
                self.workload.loss_sum,
                micro_batches,
                units,
                clip_grad_norm=self.cfg.train.clip_grad_norm,
                autocast=self.autocast,
                params=self.params,
                world=self.world,
            )

        return self.compiler.run(step, lambda: self.optimizer.zero_grad(set_to_none=True))

    @property
    def micro_size(self) -> int | None:
        """Samples per forward/backward pass on a process: batch.micro_size, else the limit a
        run resumed on fewer processes keeps (TrainState.pass_size), else none."""
        return self.cfg.batch.micro_size or self.state.pass_size

    def _read_batches(self, position: int, size: int) -> tuple[list[Any], int]:
        micro = self.micro_size
        return global_batch(self.workload, self.sampler, self.world, position, size, micro)

    def close(self) -> None:
        """Stop the background reader, undo in-place compilation, take privacy's hooks off the
        model and wait for a checkpoint being written (fit calls it however the loop ends)."""
        for part in (self.prefetcher, self.privacy, self.compiler, self.writer):
            if part is not None:
                part.close()

    def read(self, local_loss: Tensor, grad_norm: Tensor) -> StepRead:
        """The step's one host read, with this process's signal and time flags agreed."""
        signal = self.signals is not None and self.signals.received is not None
        now = self.clock.now()
        late = time_up(self.cfg.train, now)
        timed = now if self.horizon.time_s is not None else None  # agreed where it steers
        return read_step(
            local_loss, grad_norm, self.world, signal=signal, time_up=late, elapsed_s=timed
        )

    def advance(self, size: int, read: StepRead) -> None:
        st = self.state
        st.consecutive_skips = 0
        st.tokens += size * trained_tokens(self.workload, self.seq_len, self.position)
        st.step += 1
        st.samples += size
        st.clock_s = st.clock_s if read.elapsed_s is None else read.elapsed_s
        if self.ema is not None:
            self.ema.update(self.model)
        self.clock.tick()

    def due(self, every: int | None) -> bool:
        return every is not None and self.state.step % every == 0

    # ------------------------------------------------------------ evaluation and logging

    def averaged_weights(self) -> Any:
        """The weights worth evaluating and saving (schedule-free: the averaged ones)."""
        return evaluation.averaged_weights(self.model, self.optimizer, self.params)

    def evaluate(self) -> dict[str, float]:
        """Validation metrics at the current step; updates target, best, early stop, plateau."""
        with self.clock.excluded("eval"), self.averaged_weights():
            metrics = evaluation.validation_metrics(
                self.workload, self.world, self.autocast, self.ema
            )
        self.last_metrics = metrics
        w = self.workload
        self.stop(
            evaluation.record_evaluation(
                self.state,
                metrics,
                metric=w.metric,
                higher_is_better=w.higher_is_better,
                train=self.cfg.train,
                target=self.target,
            )
        )
        if self.plateau is not None:
            evaluation.update_plateau(
                self.plateau, self.cfg.plateau.monitor, metrics, self.rows.smoother
            )
        self.emit("on_eval", metrics)
        return metrics

    def log(self, read: StepRead, lr: float, size: int, metrics: dict | None) -> dict[str, Any]:
        extra = {**self.scheduled, **self.pending}
        if self.plateau is not None:
            extra["plateau_scale"] = self.plateau.scale
        if self.privacy is not None:
            extra["epsilon"] = self.privacy.epsilon(self.state.step)
        extra.update(metrics or {})
        self.pending.clear()
        row = self.rows.row(
            self.state,
            loss=read.loss,
            grad_norm=read.grad_norm,
            lr=lr,
            batch_size=size,
            extra=extra,
        )
        self.emit("on_log", row)
        return row

    # ------------------------------------------------------------ results

    def summary(self) -> dict[str, Any]:
        done = run_summary(
            self.cfg, self.workload, self.state, self.last_metrics, self.params, self.target
        )
        if self.privacy is not None:
            done["privacy"] = self.privacy.summary(self.state.step)
        return {**done, **self.horizon.summary()}  # horizon_steps, horizon_budget
