"""`train(config, run_dir)`: build the workload, fit, and leave a complete run directory."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

from cadence.config import Config, ConfigError, dump_config, load_config
from cadence.io import atomic_path, atomic_write_json, atomic_write_text
from cadence.optim import set_train_mode
from cadence.track.metrics import MetricsWriter
from cadence.track.plots import plot_run
from cadence.track.progress import ProgressBar
from cadence.track.tensorboard import TensorBoardLogger
from cadence.training.events import Callback
from cadence.training.loop import fit
from cadence.training.trainer import Trainer
from cadence.workloads import build_workload


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.workload}-{cfg.optimizer.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(run_dir: Path) -> None:
    if (run_dir / "metrics.jsonl").exists():
        raise ConfigError(
            f"--run-dir {run_dir}: already holds a run; choose another directory or delete it"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--run-dir {run_dir}: cannot create it ({exc.strerror})") from None


def train(
    config: Config | str | Path | None = None,
    run_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Train one run and return its summary (also written to run_dir/summary.json).

    Everything that can fail on user input (config, data path, model shape) fails before the run
    directory is created, so a bad invocation leaves nothing behind.
    """
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    workload = build_workload(cfg)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    prepare_run_dir(run_dir)
    tokenizer = workload.extras.get("tokenizer")
    if tokenizer is not None:
        tokenizer.save(run_dir)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))

    writer = MetricsWriter(run_dir / "metrics.jsonl")
    cbs: list[Callback] = [writer, TensorBoardLogger(run_dir / "tensorboard"), *callbacks]
    if cfg.train.progress:
        cbs.append(ProgressBar(cfg.train.max_steps))
    trainer = Trainer(cfg, workload, cbs, run_dir=run_dir)
    summary = fit(trainer)

    set_train_mode(trainer.optimizer, False)  # schedule-free: ship the averaged weights
    with atomic_path(run_dir / "model.safetensors") as tmp:
        save_model(trainer.model, str(tmp))
    if trainer.ema is not None:
        with (
            trainer.ema.applied(trainer.model),
            atomic_path(run_dir / "model_ema.safetensors") as tmp,
        ):
            save_model(trainer.model, str(tmp))
    plot_run(writer.rows, run_dir / "plots", title=f"{cfg.workload} · {cfg.optimizer.name}")
    summary["run_dir"] = str(run_dir)
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
