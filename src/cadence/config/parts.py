"""Config -> the trainer's pure parts (optimizer, LR and other schedules, plateau, batch ramp).

One place maps config keys to the builders' arguments; the trainer builds its parts with it and
the config check builds them once on a throwaway model, so each builder's own rules refuse a bad
config before anything is loaded or written. Step-valued schedule keys given as fractions of the
run are resolved to steps here, against the run's horizon (`cadence.config.horizon`): each
builder takes it as ``steps``, and left out it is the horizon as far as the config knows.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import nn

from cadence.config.horizon import batch_ramp_over, horizon, seq_len_over
from cadence.optim import OPTIMIZERS, build_optimizer, check_hparams
from cadence.schedules import BatchRamp, Plateau, Schedule, build_schedule
from cadence.schedules.checks import steps_of
from cadence.schedules.hparams import HyperSchedules, piecewise_linear
from cadence.schedules.seq_len import SeqLenSchedule

if TYPE_CHECKING:
    from cadence.config.schema import Config
    from cadence.optim import AnyOptimizer


def _steps(cfg: Config, steps: int | None) -> int:
    """The horizon the parts are laid out over: the one given, or the config's own."""
    return horizon(cfg).steps if steps is None else steps


def lr_schedule_from(cfg: Config, steps_per_epoch: int = 1, steps: int | None = None) -> Schedule:
    s, total = cfg.schedule, _steps(cfg, steps)
    return build_schedule(
        s.name,
        total_steps=total,
        warmup=steps_of(s.warmup, total, "schedule.warmup"),
        gamma=s.gamma,
        step_size=None
        if s.step_size is None
        else steps_of(s.step_size, total, "schedule.step_size"),
        milestones=tuple(steps_of(m, total, "schedule.milestones") for m in s.milestones),
        min_lr_ratio=s.min_lr_ratio,
        decay_fraction=s.decay_fraction,
        decay_steps=s.decay_steps,
        cooldown=s.cooldown,
        power=s.power,
        every=steps_per_epoch if s.per == "epoch" else 1,
        timescale=s.timescale,
        pct_start=s.pct_start,
    )


def hparam_schedules_from(cfg: Config, steps: int | None = None) -> HyperSchedules:
    """`schedule.momentum` and `schedule.weight_decay`, checked against the optimizer."""
    s, o, total = cfg.schedule, cfg.optimizer, _steps(cfg, steps)
    key = OPTIMIZERS[o.name].momentum_key
    momentum = None
    if s.momentum is not None:
        if key is None:
            have = ", ".join(n for n, spec in OPTIMIZERS.items() if spec.momentum_key)
            raise ValueError(
                f"schedule.momentum: optimizer {o.name!r} has no momentum to schedule "
                f"(these have: {have}); remove schedule.momentum"
            )
        momentum = piecewise_linear(
            s.momentum, total, "schedule.momentum", low=0.0, high=1.0, high_open=True
        )
    decay: Schedule | str | None = None
    if s.weight_decay is not None:
        if o.weight_decay == 0:
            raise ValueError(
                "schedule.weight_decay: scales optimizer.weight_decay, which is 0; "
                "set optimizer.weight_decay to the peak value"
            )
        decay = (
            "lr"
            if s.weight_decay == "lr"
            else piecewise_linear(
                s.weight_decay, total, "schedule.weight_decay", low=0.0, high=math.inf
            )
        )
    return HyperSchedules(
        momentum=momentum,
        momentum_key=key or "momentum",
        weight_decay=decay,  # type: ignore[arg-type]
        base_weight_decay=o.weight_decay,
    )


def seq_len_schedule_from(cfg: Config, steps: int | None = None) -> SeqLenSchedule | None:
    """`schedule.seq_len` for a language model whose samples are `model.seq_len` tokens."""
    return seq_len_over(cfg, _steps(cfg, steps))


def lawa_every(cfg: Config, steps: int | None = None) -> int:
    """`train.lawa_every` in steps (a fraction of the run resolves against its horizon)."""
    total = _steps(cfg, steps)
    every = steps_of(cfg.train.lawa_every, total, "train.lawa_every")
    if every < 1:
        raise ValueError(
            f"train.lawa_every: {cfg.train.lawa_every!r} is less than one step of this "
            f"{total}-step run; give steps as an integer"
        )
    return every


def plateau_from(cfg: Config) -> Plateau:
    p = cfg.plateau
    return Plateau(
        factor=p.factor,
        patience=p.patience,
        threshold=p.threshold,
        cooldown=p.cooldown,
        min_scale=p.min_scale,
    )


def batch_ramp_from(cfg: Config, n_train: int, steps: int | None = None) -> BatchRamp:
    """`batch.size: full` is the whole training set at every step (no ramp)."""
    total = horizon(cfg, n_train).steps if steps is None else steps
    return batch_ramp_over(cfg, n_train, total)


# `optimizer.lr: auto` is resolved by the LR range test before training; until then the
# optimizer is checked and built at this LR (the range test sets every step's LR itself).
AUTO_LR_PLACEHOLDER = 1.0


def _optimizer_hparams(cfg: Config) -> dict[str, Any]:
    o = cfg.optimizer
    return {
        "lr": AUTO_LR_PLACEHOLDER if o.lr == "auto" else o.lr,
        "momentum": o.momentum,
        "nesterov": o.nesterov,
        "weight_decay": o.weight_decay,
        "betas": tuple(o.betas),
        "eps": o.eps,
        "aux_lr": o.aux_lr,
        "body_lr_ratio": o.body_lr_ratio,
        "loraplus_ratio": o.loraplus_ratio,
        "fused": o.fused,
    }


def check_optimizer(cfg: Config) -> None:
    """The optimizer's rules without building it (no model needed)."""
    check_hparams(cfg.optimizer.name, **_optimizer_hparams(cfg))


def optimizer_from(cfg: Config, model: nn.Module) -> AnyOptimizer:
    return build_optimizer(cfg.optimizer.name, model, **_optimizer_hparams(cfg))
