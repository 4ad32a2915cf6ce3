"""`train` and `resume`: build the workload, fit, and leave a complete run directory."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cadence.config import Config, ConfigError, dump_config, flatten, load_config
from cadence.data import DataError
from cadence.io import atomic_path, atomic_write_json, atomic_write_text
from cadence.track.metrics import MetricsWriter
from cadence.track.plots import plot_run
from cadence.track.progress import ProgressBar
from cadence.track.tensorboard import TensorBoardLogger
from cadence.training.checkpoint import (
    CheckpointError,
    agreed,
    is_sharded_run,
    latest_valid,
    restore,
    save_weights,
    save_whole_weights,
)
from cadence.training.distributed import (
    SINGLE,
    World,
    barrier,
    broadcast_object,
    gather_model_state,
    init_world,
    shutdown,
)
from cadence.training.events import Callback
from cadence.training.loop import fit
from cadence.training.signals import StopSignals
from cadence.training.trainer import Trainer
from cadence.workloads import Workload, build_workload

# Keys that may differ when a run is resumed: budgets, cadence of evaluation/logging/saving,
# stopping targets and presentation. Anything else would make the continuation a different run.
RESUMABLE_KEYS = frozenset(
    {
        "train.max_steps",
        "train.max_samples",
        "train.max_tokens",
        "train.max_time_s",
        "train.eval_every",
        "train.eval_samples",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.target",
        "train.stop_at_target",
        "train.early_stop_patience",
        "train.progress",
        "train.threads",
    }
)


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.workload}-{cfg.optimizer.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(run_dir: Path) -> None:
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(
            f"--run-dir {run_dir}: already holds a run; resume it with "
            f"`cadence train --resume {run_dir}`, or choose another directory"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--run-dir {run_dir}: cannot write there ({exc.strerror})") from None


def train(
    config: Config | str | Path | None = None,
    run_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Train one run and return its summary (also written to run_dir/summary.json).

    Everything that can fail on user input (config, data path, model shape) fails before the run
    directory is created, so a bad invocation leaves nothing behind. Under torchrun every process
    calls this; rank 0 alone writes files.
    """
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    world = init_world(cfg.train.distributed, cfg.train.dist_timeout_s)
    try:
        _set_threads(cfg)
        run_dir = Path(broadcast_object(str(run_dir or default_run_dir(cfg)), world))
        holder: dict[str, Workload] = {}

        def prepare() -> None:
            holder["w"] = build_workload(cfg)
            prepare_run_dir(run_dir)
            tokenizer = holder["w"].extras.get("tokenizer")
            if tokenizer is not None:
                tokenizer.save(run_dir)

        _main_first(world, prepare)
        # The other ranks use the tokenizer rank 0 trained (BPE), not one of their own.
        workload = holder.get("w") or build_workload(cfg, tokenizer_dir=run_dir)
        if cfg.optimizer.lr == "auto":
            from cadence.tune import suggest_lr

            # The range test restores the weights and RNG; config.yaml records the chosen LR.
            lr = suggest_lr(cfg, workload, run_dir=run_dir if world.is_main else None)
            if world.is_main:
                print(f"cadence: optimizer.lr=auto -> {lr:.3g} (LR range test, see lr_find.json)")
            cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, lr=lr))
        return _execute(cfg, workload, run_dir, callbacks, checkpoint=None, world=world)
    finally:
        shutdown(world)


def resume(
    run_dir: str | Path,
    config: Config | str | Path | None = None,
    overrides: Sequence[str] = (),
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Continue a run from its newest valid checkpoint, exactly where it was.

    The config is the run's own `config.yaml` (or `config`), with `overrides` on top; only the
    keys in RESUMABLE_KEYS may differ from what the run was started with. Raising
    `train.max_steps` extends a finished run (a `wsd` cooldown moves to the new end). The number
    of processes may differ from the run's: whole checkpoints hold replicated state, and sharded
    (FSDP) checkpoints are resharded on load.
    """
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"--resume {run_dir}: no run there (config.yaml not found)")
    saved = load_config(saved_path)
    if isinstance(config, Config):
        cfg = config
    else:
        cfg = load_config(config if config is not None else saved_path, overrides)
    changed = sorted(
        k
        for k, v in flatten(cfg.to_dict()).items()
        if flatten(saved.to_dict()).get(k) != v and k not in RESUMABLE_KEYS
    )
    if changed:
        raise ConfigError(
            f"--resume {run_dir}: the config differs from the run's in {', '.join(changed)}; "
            "only budgets, evaluation/logging/checkpoint cadence and targets may change"
        )
    world = init_world(cfg.train.distributed, cfg.train.dist_timeout_s)
    try:
        # Rank 0 checks the checksums; every rank resumes from the checkpoint it chose.
        checkpoint, warnings = agreed(lambda: latest_valid(run_dir / "checkpoints"), world)
        if world.is_main:
            for line in warnings:
                print(f"cadence: warning: {line}", flush=True)
        if checkpoint is None:
            raise ConfigError(
                f"--resume {run_dir}: no valid checkpoint in {run_dir / 'checkpoints'}; "
                "start a new run instead"
            )
        _set_threads(cfg)
        workload = build_workload(cfg, tokenizer_dir=run_dir)
        return _execute(cfg, workload, run_dir, callbacks, checkpoint=checkpoint, world=world)
    finally:
        shutdown(world)


def _set_threads(cfg: Config) -> None:
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)


def _main_first(world: World, fn: Any) -> None:
    """Run `fn` on rank 0 first; a user error there is raised on every rank (no rank hangs)."""
    error = None
    if world.is_main:
        try:
            fn()
        except (ConfigError, DataError) as exc:
            error = str(exc)
    error = broadcast_object(error, world)
    if error is not None:
        raise ConfigError(error)


def _execute(
    cfg: Config,
    workload: Workload,
    run_dir: Path,
    callbacks: Sequence[Callback],
    checkpoint: Path | None,
    world: World = SINGLE,
) -> dict[str, Any]:
    main = world.is_main
    cbs: list[Callback] = []
    tensorboard = None
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    if main:  # logs, plots and progress come from rank 0 only
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        tensorboard = TensorBoardLogger(run_dir / "tensorboard")
        cbs = [writer, tensorboard, *callbacks]
        if cfg.train.progress:
            cbs.append(ProgressBar(cfg.train.max_steps))
    trainer = Trainer(cfg, workload, cbs, run_dir=run_dir, world=world)
    if checkpoint is not None:
        try:
            restore(trainer, checkpoint, verified=True)
        except CheckpointError as exc:
            raise ConfigError(f"--resume: {exc}") from None
        trainer.state.stop_reason = None
    try:
        with StopSignals() as signals:
            trainer.signals = signals
            summary = fit(trainer)
            trainer.signals = None
    finally:
        if tensorboard is not None:
            tensorboard.close()
    summary["world_size"] = world.size
    summary["tokens_per_s_per_process"] = summary["tokens_per_s"] / world.size
    summary["samples_per_s_per_process"] = summary["samples_per_s"] / world.size
    summary["run_dir"] = str(run_dir)
    gathered = _gather_final(trainer)  # a collective under FSDP2
    if main:
        _write_final(trainer, run_dir, writer, summary, *gathered)
    barrier(world)
    return summary


def _gather_final(trainer: Trainer) -> tuple[dict | None, dict | None]:
    """Whole final (and EMA) weights of a sharded run, gathered by every rank; None otherwise."""
    if not is_sharded_run(trainer):
        return None, None
    with trainer.averaged_weights():
        weights = gather_model_state(trainer.model)
    ema = None
    if trainer.ema is not None:
        with trainer.ema.applied(trainer.model):  # reshards on entry and exit
            ema = gather_model_state(trainer.model)
    return weights, ema


def _write_final(
    trainer: Trainer,
    run_dir: Path,
    writer: MetricsWriter,
    summary: dict[str, Any],
    weights: dict | None,
    ema: dict | None,
) -> None:
    cfg = trainer.cfg
    with atomic_path(run_dir / "model.safetensors") as tmp:
        if weights is not None:
            save_whole_weights(trainer.model, weights, tmp)
        else:
            with trainer.averaged_weights():
                save_weights(trainer.model, tmp)
    if trainer.ema is not None:
        with atomic_path(run_dir / "model_ema.safetensors") as tmp:
            if ema is not None:
                save_whole_weights(trainer.model, ema, tmp)
            else:
                with trainer.ema.applied(trainer.model):
                    save_weights(trainer.model, tmp)
    plot_run(writer.rows, run_dir / "plots", title=f"{cfg.workload} · {cfg.optimizer.name}")
    atomic_write_json(run_dir / "summary.json", summary)
