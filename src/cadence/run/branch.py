"""Cooldown branches: one stable-phase run, many budgets (warmup-stable-decay's promise).

A WSD (or constant-LR) run trains at its peak LR until its own cooldown; any checkpoint saved in
that stable phase can be cooled down for M more steps into a new run directory, as Hägele et al.
(2024) do to read off a whole scaling curve from one run. The branch is an ordinary run:
its config is the source's with ``schedule.name: wsd``, ``schedule.decay_steps: M`` and
``train.max_steps: S + M``, its checkpoints start with a copy of the source's at step S, and it
is trained by :func:`~cadence.run.session.resume`, so it is exactly the run that config would
have trained from scratch (the tests compare the two bit for bit). The source is only read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from cadence.config import Config, ConfigError, dump_config
from cadence.config.horizon import horizon
from cadence.config.parts import batch_ramp_from, steps_of
from cadence.io import atomic_write_text
from cadence.run.configs import load_config
from cadence.run.session import resume
from cadence.schedules import wsd_cooldown_start
from cadence.schedules.checks import COOLDOWNS
from cadence.schedules.hparams import piecewise_linear
from cadence.track.metrics import read_metrics
from cadence.training.checkpoint import CheckpointError, list_checkpoints, verify
from cadence.workloads import Workload

__all__ = ["cooldown", "plan_cooldown"]

# What a branch does not copy from its source: what it writes itself (its config, metrics up to
# the branch point, final files) and the checkpoints other than the one it starts from.
_NOT_COPIED = {
    "checkpoints",
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "model.safetensors",
    "plots",
    "tensorboard",
}


def _checkpoint(source: Path, at: int | None, stable_end: int) -> tuple[Path, int]:
    """The checkpoint ``at``, or the newest valid one of the stable phase."""
    root = source / "checkpoints"
    if at is None:
        stable = [p for p in list_checkpoints(root) if _step_of(p) <= stable_end]
        path = next((p for p in reversed(stable) if _verifies(p)), None)
        if path is None:
            raise ConfigError(
                f"cooldown: no valid checkpoint in {root} from the stable phase (steps up to "
                f"{stable_end}); set train.checkpoint_every and keep_checkpoints to keep some"
            )
    else:
        path = root / f"step_{at:08d}"
        if not path.is_dir():
            saved = [_step_of(p) for p in list_checkpoints(root)]
            raise ConfigError(
                f"--at {at}: {source} has no checkpoint at that step "
                f"(saved: {', '.join(map(str, saved)) or 'none'})"
            )
    try:
        manifest = verify(path)
    except CheckpointError as exc:
        raise ConfigError(f"cooldown: {exc}") from None
    return path, int(manifest["step"])


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _verifies(path: Path) -> bool:
    try:
        verify(path)
    except CheckpointError:
        return False
    return True


def _stable_until(cfg: Config, warmup: int, total: int) -> int:
    """The first step of the source's own cooldown (its horizon for a constant LR)."""
    s = cfg.schedule
    if s.name == "constant":
        return total
    return wsd_cooldown_start(total, warmup, s.decay_fraction, s.decay_steps)


def _resolved_points(points: list[list[Any]] | None, total: int, key: str) -> list[list[Any]]:
    """Fractional positions as the source's steps: the branch's own run is shorter or longer."""
    if points is None:
        return []
    steps = piecewise_linear(points, total, key, low=0.0, high=float("inf")).steps
    return [[step, value] for step, (_, value) in zip(steps, points)]


def plan_cooldown(
    source: str | Path,
    steps: int,
    *,
    at: int | None = None,
    shape: str | None = None,
    min_lr_ratio: float | None = None,
) -> tuple[Config, Path, int]:
    """The branch's config, the checkpoint it starts from and its step; every check, no writes."""
    source = Path(source)
    if not (source / "config.yaml").is_file():
        raise ConfigError(f"cooldown: no run in {source} (config.yaml not found)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps: the cooldown needs a positive number of steps, got {steps}")
    if shape is not None and shape not in COOLDOWNS:
        raise ConfigError(f"--shape: one of {', '.join(COOLDOWNS)}, got {shape!r}")
    cfg = load_config(source / "config.yaml")
    # the source's schedule was laid out over its horizon, which a budget in samples or
    # tokens may have put before train.max_steps
    span = horizon(cfg)
    if not span.exact:
        raise ConfigError(
            f"cooldown: {source} ends on {', '.join(span.pending)}, which its workload turns "
            "into steps; branch from a run whose budget is train.max_steps"
        )
    s, total = cfg.schedule, span.steps
    if s.name not in ("wsd", "constant"):
        raise ConfigError(
            f"cooldown: {source} trains with schedule.name={s.name}, whose LR is not flat "
            "before its end; branch from a wsd or constant-LR run"
        )
    warmup = steps_of(s.warmup, total, "schedule.warmup")
    stable_end = _stable_until(cfg, warmup, total)
    checkpoint, step = _checkpoint(source, at, stable_end)
    if step < warmup:
        raise ConfigError(
            f"cooldown: the checkpoint at step {step} is inside the warmup ({warmup} steps); "
            "pick a later one with --at"
        )
    if step > stable_end:
        raise ConfigError(
            f"cooldown: the checkpoint at step {step} is past the start of {source}'s own "
            f"cooldown (step {stable_end}); pick one from the stable phase with --at"
        )
    new_total = step + steps
    overrides = [
        "schedule.name=wsd",
        f"schedule.warmup={warmup}",
        f"schedule.decay_steps={steps}",
        f"schedule.cooldown={shape or s.cooldown}",
        f"train.max_steps={new_total}",
        "train.max_samples=null",
        "train.max_tokens=null",
        "train.max_time_s=null",
    ]
    if min_lr_ratio is not None:
        overrides.append(f"schedule.min_lr_ratio={min_lr_ratio!r}")
    for key, points in (
        ("momentum", s.momentum),
        ("weight_decay", s.weight_decay),
        ("seq_len", s.seq_len),
    ):
        if isinstance(points, list):
            resolved = _resolved_points(points, total, f"schedule.{key}")
            overrides.append(f"schedule.{key}={json.dumps(resolved)}")
    branch = load_config(source / "config.yaml", overrides)
    if cfg.batch.schedule and cfg.batch.size != "full":
        # ramp stages sit at fractions of the run, which the branch's length moves
        before, after = batch_ramp_from(cfg, 1), batch_ramp_from(branch, 1)
        if any(t > step for t in (*before.stage_starts, *after.stage_starts)):
            raise ConfigError(
                f"cooldown: batch.schedule has a stage after step {step} in the source or the "
                "branch (stages are fractions of the run); branch from a checkpoint after the "
                "last stage"
            )
    return branch, checkpoint, step


def cooldown(
    source: str | Path,
    steps: int,
    *,
    at: int | None = None,
    shape: str | None = None,
    min_lr_ratio: float | None = None,
    run_dir: str | Path | None = None,
    workload: Workload | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Cool down ``source`` from its checkpoint ``at`` (default: its newest) over ``steps``
    steps into ``run_dir`` (default: ``SOURCE-cooldown-S+M`` next to it); returns the summary.

    The new directory is assembled under a temporary name and renamed into place before
    training starts, so it is either absent or a resumable run (``cadence train --resume``).
    """
    source = Path(source)
    branch, checkpoint, step = plan_cooldown(
        source, steps, at=at, shape=shape, min_lr_ratio=min_lr_ratio
    )
    out = Path(run_dir) if run_dir is not None else source.with_name(
        f"{source.name}-cooldown-{step}+{steps}"
    )  # fmt: skip
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--run-dir {out}: already exists; choose another directory")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        for item in source.iterdir():
            if item.name in _NOT_COPIED or item.name.startswith("."):
                continue
            copy = shutil.copytree if item.is_dir() else shutil.copy2
            copy(item, tmp / item.name)
        shutil.copytree(checkpoint, tmp / "checkpoints" / checkpoint.name)
        rows = [r for r in read_metrics(source / "metrics.jsonl") if r["step"] <= step]
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "config.yaml").write_text(dump_config(branch))
        provenance = {"source": str(source), "step": step, "cooldown_steps": steps}
        atomic_write_text(tmp / "branch.json", json.dumps(provenance, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # an empty directory the user made for it
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return resume(out, config=branch, workload=workload, plots=plots)
