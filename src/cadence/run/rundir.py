"""A run directory: where it goes, that it is free, and what a finished run leaves in it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cadence.config import Config, ConfigError
from cadence.io import atomic_path, atomic_write_json
from cadence.runtime.distributed import gather_model_state
from cadence.track.metrics import MetricsWriter
from cadence.track.plots import plot_run
from cadence.training.checkpoint import save_weights, save_whole_weights
from cadence.training.trainer import Trainer


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.workload}-{cfg.optimizer.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(run_dir: Path, over_partial: bool = False) -> None:
    """Make the run's directory, refusing one that holds a run. ``over_partial``: a run that
    died before its first checkpoint (``--resume auto``, a torchrun restart) has nothing to
    resume, and starts again in its directory."""
    if (run_dir / "metrics.jsonl").exists() and not over_partial:
        # Under torchrun (an agent's run id in the environment), the same command is started
        # again by the agent itself when the job's membership changes; --resume auto is the
        # form that continues then.
        how = (
            "add --resume auto so that torchrun's restarts continue it"
            if os.environ.get("TORCHELASTIC_RUN_ID")
            else f"resume it with `cadence train --resume {run_dir}`"
        )
        raise ConfigError(
            f"--run-dir {run_dir}: already holds a run; {how}, or choose another directory"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--run-dir {run_dir}: cannot write there ({exc.strerror})") from None


def gather_final(trainer: Trainer) -> tuple[dict | None, dict | None]:
    """Whole final (and EMA) weights of a sharded run, gathered by every rank; None otherwise."""
    if not trainer.sharded:
        return None, None
    with trainer.averaged_weights():
        weights = gather_model_state(trainer.model)
    ema = None
    if trainer.ema is not None:
        with trainer.ema.applied(trainer.model):  # reshards on entry and exit
            ema = gather_model_state(trainer.model)
    return weights, ema


def write_final(
    trainer: Trainer,
    run_dir: Path,
    writer: MetricsWriter,
    summary: dict[str, Any],
    weights: dict | None,
    ema: dict | None,
    plots: bool = True,
) -> None:
    """model.safetensors (and model_ema), plots/ and summary.json, each written atomically."""
    cfg = trainer.cfg
    with atomic_path(run_dir / "model.safetensors") as tmp:
        if weights is not None:
            save_whole_weights(trainer.model, weights, tmp)
        else:
            trainer.save_weights(tmp)  # the averaged weights of schedule-free, as checkpoints
    if trainer.ema is not None:
        with atomic_path(run_dir / "model_ema.safetensors") as tmp:
            if ema is not None:
                save_whole_weights(trainer.model, ema, tmp)
            else:
                with trainer.ema.applied(trainer.model):
                    save_weights(trainer.model, tmp)
    if plots:
        plot_run(writer.rows, run_dir / "plots", title=f"{cfg.workload} · {cfg.optimizer.name}")
    atomic_write_json(run_dir / "summary.json", summary)
