"""`train` and `resume`: build the workload, fit, and leave a complete run directory.

This is the run layer, above the trainer and the tuners: it resolves ``optimizer.lr: auto``
with the LR range test, attaches the loggers (metrics.jsonl, TensorBoard, progress bar) and the
gradient-noise monitor (``train.log_noise_scale``) as ordinary callbacks, handles signals, and
writes the final files.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from cadence.config import Config, ConfigError, dump_config, flatten
from cadence.config.horizon import Horizon
from cadence.config.horizon import horizon as config_horizon
from cadence.config.parts import lawa_every
from cadence.config.validate import check_horizon, provisional
from cadence.data import DataError
from cadence.data.chat import TEMPLATE_FILE
from cadence.io import atomic_write_text
from cadence.run.configs import load_config
from cadence.run.rundir import default_run_dir, gather_final, prepare_run_dir, write_final
from cadence.runtime.distributed import (
    SINGLE,
    World,
    barrier,
    broadcast_object,
    init_world,
    shutdown,
)
from cadence.runtime.events import Callback
from cadence.track.metrics import InspectWriter, MetricsWriter
from cadence.track.progress import ProgressBar
from cadence.track.tensorboard import TensorBoardLogger
from cadence.training.checkpoint import CheckpointError, agreed, latest_valid, restore
from cadence.training.lawa import LAWA
from cadence.training.loop import fit
from cadence.training.privacy import resolve_privacy
from cadence.training.signals import StopSignals
from cadence.training.trainer import Trainer
from cadence.tune.auto_recipe import choose_auto, plan_pilot
from cadence.tune.noise_scale import NoiseScaleMonitor
from cadence.workloads import Workload, build_workload, prepare

# Keys that may differ when a run is resumed: budgets, cadence of evaluation/logging/saving,
# stopping targets, presentation and inspection. Anything else would make the continuation a different run.
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
        "train.async_checkpoint",
        "train.target",
        "train.stop_at_target",
        "train.early_stop_patience",
        "train.progress",
        "train.threads",
        # what the run measures (read-only), and its answer to spikes: a user who has seen one
        # turns these on, or skips the data that caused it, when resuming
        "train.inspect_every",
        "train.sharpness_every",
        "train.on_spike",
        "train.spike_z",
        "train.spike_window",
        "train.skip_samples",
    }
)


def train(
    config: Config | str | Path | None = None,
    run_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    overrides: Sequence[str] = (),
    *,
    workload: Workload | None = None,
    plots: bool = True,
    over_partial: bool = False,
) -> dict[str, Any]:
    """Train one run and return its summary (also written to run_dir/summary.json).

    `workload` trains a workload built in Python (a :class:`cadence.DatasetWorkload`) instead
    of the one the config's ``workload:`` names; pass it to :func:`resume` as well. Everything
    that can fail on user input (config, data path, model shape) fails before the run
    directory is created, so a bad invocation leaves nothing behind. Under torchrun every process
    calls this; rank 0 alone writes files. ``plots=False`` skips the PNGs (matplotlib costs
    seconds, more than a tiny run trains; ``compare`` draws its own from metrics.jsonl).
    ``over_partial`` starts again over a run that has no checkpoint (see :func:`auto_resume`).
    """
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    with _process_group(cfg) as world:
        _set_threads(cfg)
        run_dir = Path(broadcast_object(str(run_dir or default_run_dir(cfg)), world))
        holder: dict[str, Workload] = {}

        def prepare() -> None:
            holder["w"] = _workload(cfg, workload)
            # a budget the workload's counts make impossible fails before anything is written,
            # and so does one too small for batch.size: auto's pilot
            w = holder["w"]
            ahead = check_horizon(provisional(cfg), w.n_train, w.tokens_per_sample)
            # privacy: the checks on the built model and the noise multiplier it will use
            if cfg.privacy.enabled:
                holder["private"] = resolve_privacy(cfg, w, ahead.steps, world)
            plan_pilot(cfg, w)
            prepare_run_dir(run_dir, over_partial)
            tokenizer = holder["w"].extras.get("tokenizer")
            if tokenizer is not None:
                tokenizer.save(run_dir)
            template = holder["w"].extras.get("chat_template")
            if isinstance(template, str):  # how conversations were rendered, for serving them
                atomic_write_text(run_dir / TEMPLATE_FILE, template)
            labels = holder["w"].extras.get("labels")
            if labels is not None:  # a classifier's class names, for export and serving
                atomic_write_text(run_dir / "labels.json", json.dumps(labels) + "\n")
            save_config = getattr(holder["w"].model, "save_config", None)
            if callable(save_config):  # a Hugging Face model's shape, to rebuild it offline
                save_config(run_dir)

        _main_first(world, prepare)
        # The other ranks use the tokenizer rank 0 trained (BPE), not one of their own.
        workload = holder.get("w") or _workload(cfg, workload, tokenizer_dir=run_dir)
        # Every `auto` is decided here, on every rank alike (the pilot restores the weights and
        # the RNG); config.yaml records the decided values, so a resume never decides again.
        cfg, auto = choose_auto(
            cfg,
            workload,
            run_dir=run_dir if world.is_main else None,
            log=print if world.is_main else lambda _: None,
        )
        # auto never runs beside privacy (the config check refuses it): the noise rank 0
        # decided before the run directory was made is the one every rank and config.yaml use
        if cfg.privacy.enabled:
            cfg = broadcast_object(holder.get("private"), world)
        summary = _execute(cfg, workload, run_dir, callbacks, None, world, plots, auto)
    return summary


def resume(
    run_dir: str | Path,
    config: Config | str | Path | None = None,
    overrides: Sequence[str] = (),
    callbacks: Sequence[Callback] = (),
    *,
    workload: Workload | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Continue a run from its newest valid checkpoint, exactly where it was.

    The config is the run's own `config.yaml` (or `config`), with `overrides` on top; only the
    keys in RESUMABLE_KEYS may differ from what the run was started with. Raising
    `train.max_steps` extends a finished run (a `wsd` cooldown moves to the new end). The number
    of processes may differ from the run's: whole checkpoints hold replicated state, and sharded
    (FSDP) checkpoints are resharded on load.
    """
    run_dir = Path(run_dir)
    cfg = resume_config(run_dir, config, overrides)
    with _process_group(cfg) as world:
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
        built = _workload(cfg, workload, tokenizer_dir=run_dir)
        summary = _execute(cfg, built, run_dir, callbacks, checkpoint, world, plots)
    return summary


def restart_count() -> int:
    """How many times torchrun's agent has restarted this job's workers (0: the first start)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def auto_resume(
    run_dir: str | Path,
    config: Config | str | Path | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """``--resume auto`` and torchrun's restarts: continue ``run_dir`` from its newest valid
    checkpoint, or start it fresh when it has none (a new directory, or a run that died before
    its first checkpoint). The choice reads only checkpoints, which no process can write before
    every process has joined the run, so all of them choose alike; a resume then takes the
    checkpoint rank 0 verified. A resumed run follows its config.yaml: of ``overrides`` only
    the keys a resume may change (RESUMABLE_KEYS: budgets, cadence) apply, since the rest were
    decided when the run started (an ``auto`` LR, for one)."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    found = latest_valid(root)[0] if root.is_dir() else None
    n = restart_count()
    why = f"torchrun restart {n}" if n else "--resume auto"
    say = os.environ.get("RANK", "0") == "0"
    if found is not None:
        if say:
            print(f"cadence: {why}: resuming {run_dir} from {found.name}", flush=True)
        keep = [o for o in overrides if o.split("=", 1)[0].strip() in RESUMABLE_KEYS]
        return resume(run_dir, overrides=keep)
    if say:
        print(f"cadence: {why}: {run_dir} holds no checkpoint; starting it fresh", flush=True)
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    return train(cfg, run_dir=run_dir, over_partial=True)


def resume_config(
    run_dir: str | Path,
    config: Config | str | Path | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """The config a resume of `run_dir` would run with; a ConfigError if there is no run or the
    config changes more than RESUMABLE_KEYS. (`--nproc` checks this once before any rank starts.)"""
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"--resume {run_dir}: no run there (config.yaml not found)")
    saved = load_config(saved_path)
    if isinstance(config, Config):
        cfg = config
    else:
        cfg = load_config(config if config is not None else saved_path, overrides)
    before = flatten(saved.to_dict())
    changed = sorted(
        k
        for k, v in flatten(cfg.to_dict()).items()
        if before.get(k) != v and k not in RESUMABLE_KEYS
    )
    if changed:
        raise ConfigError(
            f"--resume {run_dir}: the config differs from the run's in {', '.join(changed)}; "
            "only budgets, evaluation/logging/checkpoint cadence and targets may change"
        )
    return cfg


@contextlib.contextmanager
def _process_group(cfg: Config) -> Iterator[World]:
    """The run's torch.distributed world: after a clean finish the ranks meet at a barrier before
    the group is destroyed; after an error it is torn down at once."""
    world = init_world(cfg.train.distributed, cfg.train.dist_timeout_s)
    try:
        yield world
    except BaseException:
        shutdown(world, clean=False)
        raise
    shutdown(world)


def _workload(cfg: Config, given: Workload | None, tokenizer_dir: Path | None = None) -> Workload:
    """The config's workload, or the one given in Python, ready for this config's run."""
    if given is None:
        return build_workload(cfg, tokenizer_dir=tokenizer_dir)
    if not isinstance(given, Workload):
        raise ConfigError(
            f"workload: expected a cadence.Workload (e.g. cadence.DatasetWorkload), "
            f"got {type(given).__name__}"
        )
    return prepare(given, cfg)


def _set_threads(cfg: Config) -> None:
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)


def _main_first(world: World, fn: Callable[[], None]) -> None:
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


def run_callbacks(
    cfg: Config, run_dir: Path, world: World, horizon: Horizon | None = None
) -> list[Callback]:
    """The callbacks a run attaches for its config: on every rank the measuring ones (a
    measurement under FSDP2 is a collective), on rank 0 alone the ones that write or show.
    ``horizon``: the run's (None: as far as the config knows it)."""
    cbs: list[Callback] = []
    t = cfg.train
    steps = (config_horizon(cfg) if horizon is None else horizon).steps
    if t.lawa is not None:  # on every rank: its evaluation is a collective under DDP
        cbs.append(LAWA(t.lawa, lawa_every(cfg, steps)))
    # batch.schedule: auto measures and logs the noise scale itself (Trainer.decide_batch)
    if t.log_noise_scale and cfg.batch.schedule != "auto":
        every = t.noise_scale_every or t.eval_every
        cbs.append(NoiseScaleMonitor(every=every))  # writes noise_scale.jsonl on rank 0
    if world.is_main:
        if t.inspect_every:
            cbs.append(InspectWriter(run_dir / "inspect.jsonl"))
        cbs.append(TensorBoardLogger(run_dir / "tensorboard"))
        if t.progress:
            cbs.append(ProgressBar(steps))
    return cbs


def _execute(
    cfg: Config,
    workload: Workload,
    run_dir: Path,
    callbacks: Sequence[Callback],
    checkpoint: Path | None,
    world: World = SINGLE,
    plots: bool = True,
    auto: dict[str, Any] | None = None,
) -> dict[str, Any]:
    main = world.is_main
    # Checked before config.yaml is written, so a resume with a budget that cannot be a horizon
    # leaves the run as it was; its warnings and the line naming it come once, from rank 0.
    horizon = check_horizon(cfg, workload.n_train, workload.tokens_per_sample, warn=main)
    if main and len(horizon.given) > 1:
        print(f"cadence: {horizon.describe()}", flush=True)
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    if main:  # logs, plots and progress come from rank 0 only
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    cbs = run_callbacks(cfg, run_dir, world, horizon)
    # metrics.jsonl first, so a row is on disk before anyone else sees it; the user's last.
    cbs = ([writer] if main else []) + cbs + (list(callbacks) if main else [])
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
        for cb in cbs:
            if isinstance(cb, TensorBoardLogger):
                cb.close()
    summary["world_size"] = world.size
    summary["tokens_per_s_per_process"] = summary["tokens_per_s"] / world.size
    summary["samples_per_s_per_process"] = summary["samples_per_s"] / world.size
    summary["run_dir"] = str(run_dir)
    if auto is not None:  # what was decided before training (auto.json has the measurements)
        summary["auto"] = {
            **auto["decided"],
            **({"pilot": auto["pilot"]} if "pilot" in auto else {}),
        }
    gathered = gather_final(trainer)  # a collective under FSDP2
    if main:
        write_final(trainer, run_dir, writer, summary, *gathered, plots=plots)
    barrier(world)
    return summary
