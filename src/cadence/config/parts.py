"""Config -> the trainer's pure parts. One place, used by the trainer and by config validation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from cadence.optim import build_optimizer
from cadence.schedules import BatchRamp, Plateau, Schedule, build_schedule

if TYPE_CHECKING:
    from cadence.config import Config
    from cadence.optim import AnyOptimizer


def lr_schedule_from(cfg: Config, steps_per_epoch: int = 1) -> Schedule:
    s = cfg.schedule
    return build_schedule(
        s.name,
        total_steps=cfg.train.max_steps,
        warmup=s.warmup,
        gamma=s.gamma,
        step_size=s.step_size,
        milestones=tuple(s.milestones),
        min_lr_ratio=s.min_lr_ratio,
        decay_fraction=s.decay_fraction,
        cooldown=s.cooldown,
        power=s.power,
        every=steps_per_epoch if s.per == "epoch" else 1,
        timescale=s.timescale,
        pct_start=s.pct_start,
    )


def plateau_from(cfg: Config) -> Plateau:
    p = cfg.plateau
    return Plateau(
        factor=p.factor,
        patience=p.patience,
        threshold=p.threshold,
        cooldown=p.cooldown,
        min_scale=p.min_scale,
    )


def batch_ramp_from(cfg: Config, n_train: int) -> BatchRamp:
    """`batch.size: full` is the whole training set at every step (no ramp)."""
    b = cfg.batch
    base = n_train if b.size == "full" else int(b.size)
    stages = [(float(f), int(n)) for f, n in b.schedule]
    return BatchRamp(base, stages, total_steps=cfg.train.max_steps, rule=b.lr_scaling)


def optimizer_from(cfg: Config, model: nn.Module) -> AnyOptimizer:
    o = cfg.optimizer
    # 'auto' is resolved by the LR range test before training; 1.0 only lets the config check
    # build the optimizer once.
    return build_optimizer(
        o.name,
        model,
        lr=1.0 if o.lr == "auto" else o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
        betas=(o.betas[0], o.betas[1]),
        eps=o.eps,
        aux_lr=o.aux_lr,
    )
