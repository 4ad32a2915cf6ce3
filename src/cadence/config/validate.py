"""The config's own rules, and a call to each builder's rules (the one home of each).

A rule lives where the thing it guards is built: the optimizer's in ``cadence.optim``, the
schedules', plateau's and batch ramp's in ``cadence.schedules``. This module holds only what no
builder knows: budgets, cadences, the run's files and devices, and rules that tie sections
together (full-batch GD needs ``batch.size: full``). Rules about the workload (its name, the
architectures and model shapes it supports) are ``cadence.workloads.check_config``'s.

The schedules are built against the run's horizon (`cadence.config.horizon`). The config check
sees the horizon as far as the config knows it; a run checks again with its workload's sample
and token counts (`check_horizon`) before it writes anything, and warns there, once, of every
setting that puts a change of a schedule outside the run.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from cadence.config.horizon import STEPS, Horizon, horizon
from cadence.config.parts import (
    batch_ramp_from,
    check_optimizer,
    hparam_schedules_from,
    lawa_every,
    lr_schedule_from,
    plateau_from,
    seq_len_schedule_from,
)
from cadence.config.privacy import check_privacy
from cadence.config.schema import PILOT_BATCH, Config, ConfigError, ConfigWarning, TrainConfig
from cadence.data.checks import (
    check_max_bytes,
    check_text_path,
    check_tokenizer,
    check_val_fraction,
)
from cadence.optim import OPTIMIZERS, check_width_rule
from cadence.schedules import split_micro


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Raise ConfigError (one line naming the key) unless every rule holds."""
    _check(
        isinstance(cfg.workload, str) and bool(cfg.workload.strip()),
        f"workload: expected a workload name, got {cfg.workload!r}",
    )
    _check_builders(provisional(cfg))
    _check_auto(cfg)
    _check_batch(cfg)
    _check_train(cfg)
    _check_data(cfg)
    _check_model(cfg)
    check_privacy(cfg)


def _check_model(cfg: Config) -> None:
    """The Hugging Face and fine-tuning keys' shape (the model itself is checked by the
    workload layer, which can load its config)."""
    m = cfg.model
    _check(
        m.hf is None or m.hf_config is None,
        "model.hf: give a model directory (model.hf) or a fresh config (model.hf_config), not both",
    )
    _check(
        (m.hf is None and m.hf_config is None) or cfg.workload == "lm",
        f"model.hf: Hugging Face causal LMs train on workload lm, not {cfg.workload!r}",
    )
    _check(
        m.hf is None or bool(m.hf.strip()),
        "model.hf: expected the path of a local model directory",
    )
    if m.hf_config is not None:
        _check(
            isinstance(m.hf_config.get("model_type"), str),
            "model.hf_config: needs a model_type (e.g. llama, gpt2) next to the sizes",
        )
    for i, pattern in enumerate(m.freeze):
        _check(bool(pattern.strip()), f"model.freeze[{i}]: expected a parameter-name pattern")
    if m.parametrization == "mup":
        _check(
            cfg.workload == "lm"
            and m.hf is None
            and m.hf_config is None
            and m.arch in (None, "gpt"),
            "model.parametrization: mup is built into cadence's GPT (workload lm, model.arch "
            "gpt); a model of your own states its LR factors with lr_multipliers()",
        )
        try:
            check_width_rule(cfg.optimizer.name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    _check_peft(cfg)
    _check_chat(cfg)
    if m.channels is not None:
        # 40 mel bins halve at most 3 times between 4 blocks
        _check(
            1 <= len(m.channels) <= 4 and all(c >= 1 for c in m.channels),
            f"model.channels: expected 1 to 4 positive widths, e.g. [32, 64, 128], got {m.channels}",
        )


def _check_chat(cfg: Config) -> None:
    """``data.format: chat | instruction``: a JSONL file of conversations for the lm workload."""
    d = cfg.data
    if d.format == "text":
        _check(
            not d.packing,
            "data.packing: packs conversations (data.format chat or instruction); text is "
            "already read in full windows",
        )
        return
    _check(
        cfg.workload == "lm",
        f"data.format: {d.format} data trains workload lm, not {cfg.workload!r}",
    )
    _check(
        d.path is not None
        and (str(d.path).endswith(".jsonl") or Path(str(d.path)).expanduser().is_dir()),
        f"data.path: data.format {d.format} reads a .jsonl file of conversations, or a folder "
        f"prepared from one (`cadence prepare-data FILE.jsonl --format {d.format}`); name one",
    )
    _check(
        cfg.schedule.seq_len is None,
        "schedule.seq_len: cuts every sample to a shorter window, which would cut conversations "
        f"apart; it does not combine with data.format {d.format}",
    )


def _check_peft(cfg: Config) -> None:
    """``model.peft`` and the keys that mean something else once only adapters train."""
    p = cfg.model.peft
    if p.method == "none":
        _check(
            cfg.optimizer.loraplus_ratio == 1.0,
            "optimizer.loraplus_ratio: scales the LR of LoRA's B matrices; it needs "
            "model.peft.method lora or dora",
        )
        return
    _check(p.r >= 1, f"model.peft.r: the adapter rank must be >= 1, got {p.r}")
    _check(p.alpha > 0, f"model.peft.alpha: must be > 0, got {p.alpha}")
    _check(0 <= p.dropout < 1, f"model.peft.dropout: must be in [0, 1), got {p.dropout}")
    if p.target_modules != "all-linear":
        _check(
            bool(p.target_modules)
            and all(isinstance(t, str) and t.strip() for t in p.target_modules),
            "model.peft.target_modules: expected all-linear or a list of module names, e.g. "
            "[q_proj, v_proj]",
        )
    _check(
        not cfg.model.freeze,
        "model.freeze: with model.peft the whole base model is frozen and only the adapters "
        "train; drop model.freeze",
    )
    _check(
        cfg.optimizer.body_lr_ratio == 1.0,
        "optimizer.body_lr_ratio: with model.peft the head is frozen and only the adapters "
        "train; use optimizer.loraplus_ratio to give their B matrices a larger LR",
    )
    _check(
        cfg.model.parametrization == "sp",
        "model.parametrization: mup sets the LR of whole weight matrices, which model.peft "
        "freezes; use sp",
    )
    _check(
        cfg.train.distributed != "fsdp",
        "train.distributed: fsdp shards whole weight matrices, and with model.peft only the "
        "small adapters train (FSDP2 over peft's frozen/trainable mix is not supported yet); "
        "use ddp",
    )


def provisional(cfg: Config) -> Config:
    """``cfg`` with what a run decides before training (``batch.size: auto``,
    ``schedule.warmup: auto``) set to stand-ins, so the builders can check the rest before
    anything is measured: the smallest batch the pilot starts from and no warmup. The decided
    values are checked again by the run, once known."""
    b, s = cfg.batch, cfg.schedule
    if b.size != "auto" and s.warmup != "auto":
        return cfg
    size = (b.micro_size or PILOT_BATCH) if b.size == "auto" else b.size
    return dataclasses.replace(
        cfg,
        batch=dataclasses.replace(b, size=size),
        schedule=dataclasses.replace(s, warmup=0 if s.warmup == "auto" else s.warmup),
    )


def fixed_batch(cfg: Config, n_train: int, command: str) -> int:
    """The global batch of a config whose batch is not left to a run's pilot (``full``: the
    training set); ConfigError naming the key for ``batch.size: auto``."""
    if cfg.batch.size == "auto":
        raise ConfigError(
            f"batch.size: auto is decided by the pilot of `cadence train`; {command} needs a "
            "batch size (--set batch.size=N)"
        )
    return n_train if cfg.batch.size == "full" else int(cfg.batch.size)


def _check_auto(cfg: Config) -> None:
    """``batch.size: auto`` chooses a batch for a budget in data, with a bounded pilot."""
    b, t = cfg.batch, cfg.train
    _check(
        0 < b.pilot <= 0.1,
        f"batch.pilot: the pilot's share of the budget must be in (0, 0.1], got {b.pilot}",
    )
    if b.size != "auto":
        return
    _check(
        not OPTIMIZERS[cfg.optimizer.name].full_batch,
        f"batch.size: auto measures the noise of mini-batch gradients, and optimizer "
        f"{cfg.optimizer.name!r} is full-batch gradient descent; set batch.size=full",
    )
    _check(
        t.max_tokens is not None or t.max_samples is not None,
        "batch.size: auto chooses the batch for a budget in data; give train.max_tokens "
        "(or train.max_samples), or set batch.size",
    )
    _check(
        not b.schedule,
        "batch.schedule: batch.size: auto chooses one batch for the run; remove batch.schedule",
    )


def _check_builders(cfg: Config) -> None:
    """Build the LR schedule, plateau and batch ramp and check the optimizer's settings once:
    each raises ValueError naming its key, which becomes the config's error."""
    try:
        check_optimizer(cfg)
        check_horizon(cfg)
        plateau_from(cfg)
        split_micro(1 if cfg.batch.size == "full" else int(cfg.batch.size), cfg.batch.micro_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_horizon(
    cfg: Config,
    n_train: int | None = None,
    tokens_per_sample: int | None = None,
    *,
    warn: bool = False,
) -> Horizon:
    """The run's horizon, with every schedule built against it (ConfigError, one line, where
    one cannot be); with ``warn``, a ConfigWarning for each setting that puts a change of a
    schedule outside the run. The counts are the workload's (None: as the config knows)."""
    try:
        h = horizon(cfg, n_train, tokens_per_sample)
        warmup = cfg.schedule.warmup
        if h.budget != STEPS and type(warmup) is int and warmup >= h.steps:
            raise ConfigError(
                f"{h.budget}: the budget ends at step {h.steps}, before the warmup of {warmup} "
                f"steps (schedule.warmup) is over; give the warmup as a fraction of the run "
                f"(e.g. schedule.warmup=0.1), shorten it, or raise {h.budget}"
            )
        lr_schedule_from(cfg, steps=h.steps)
        hparam_schedules_from(cfg, h.steps)
        seq_len_schedule_from(cfg, h.steps)
        ramp = None if cfg.batch.size == "full" else batch_ramp_from(cfg, 1, h.steps)
        every = lawa_every(cfg, h.steps) if cfg.train.lawa is not None else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if warn:
        starts = () if ramp is None else ramp.stage_starts
        for line in _outside_the_run(cfg, h, starts, every):
            warnings.warn(line, ConfigWarning, stacklevel=2)
    return h


def _outside_the_run(
    cfg: Config, h: Horizon, stage_starts: tuple[int, ...], lawa: int | None
) -> list[str]:
    """One line for each change a schedule would make at or after the horizon: the run ends
    before it, so the setting does nothing, or not what it says."""
    s, end = cfg.schedule, f"the horizon (step {h.steps}, {h.budget})"
    lines = []
    if s.name == "multistep":
        late = [m for m in s.milestones if type(m) is int and m >= h.steps]
        if late:
            lines.append(f"schedule.milestones: {late} at or past {end}; the LR never decays there")
    if s.name == "step" and type(s.step_size) is int and s.step_size >= h.steps:
        lines.append(f"schedule.step_size: {s.step_size} steps reach {end}; the LR never decays")
    if s.name == "inverse-sqrt" and s.timescale is not None and s.timescale >= h.steps:
        lines.append(f"schedule.timescale: {s.timescale} steps reach {end}; the LR never decays")
    for key in ("momentum", "weight_decay", "seq_len"):
        points = getattr(s, key)
        late = (
            [p[0] for p in points if type(p[0]) is int and p[0] > h.steps]
            if isinstance(points, list)
            else []
        )
        if late:
            lines.append(
                f"schedule.{key}: points at steps {late} lie past {end}; the run ends first"
            )
    for i, start in enumerate(stage_starts):
        if start >= h.steps:
            lines.append(
                f"batch.schedule[{i}]: starts at step {start}, at or past {end}; "
                "that stage never trains"
            )
    if lawa is not None and lawa > h.steps:
        lines.append(f"train.lawa_every: {lawa} steps is longer than {end}; LAWA takes no snapshot")
    return lines


def _check_batch(cfg: Config) -> None:
    o, b = cfg.optimizer, cfg.batch
    _check(
        not (b.schedule and b.size == "full"),
        "batch.schedule: a batch ramp needs an integer batch.size",
    )
    _check(
        not OPTIMIZERS[o.name].full_batch or b.size == "full",
        f"batch.size: optimizer {o.name!r} is full-batch gradient descent; set batch.size=full",
    )
    _check(
        o.lr != "auto" or not OPTIMIZERS[o.name].lr_free,
        f"optimizer.lr: auto runs the LR range test, but {o.name} estimates its own step size; "
        "set optimizer.lr=1.0",
    )
    shards = ", ".join(n for n, s in OPTIMIZERS.items() if s.shardable)
    _check(
        OPTIMIZERS[o.name].shardable or cfg.train.distributed != "fsdp",
        f"optimizer.name: {o.name!r} needs whole tensors and does not run on FSDP2-sharded "
        f"parameters; use train.distributed=ddp, or one of: {shards}",
    )


def _check_inspection(t: TrainConfig) -> None:
    """inspect_every, sharpness_every, the spike policy and skipped data windows."""
    for key in ("inspect_every", "sharpness_every"):
        v = getattr(t, key)
        _check(v is None or v >= 1, f"train.{key}: must be >= 1 (steps) or null, got {v}")
    _check(t.spike_z > 0, f"train.spike_z: must be > 0, got {t.spike_z}")
    _check(t.spike_window >= 5, f"train.spike_window: must be >= 5 losses, got {t.spike_window}")
    _check(
        t.on_spike != "rollback" or t.checkpoint_every is not None,
        "train.on_spike: rollback needs train.checkpoint_every (a checkpoint to go back to)",
    )
    for w in t.skip_samples or ():
        _check(
            len(w) == 2 and 0 <= w[0] < w[1],
            f"train.skip_samples: each window is [start, end) with 0 <= start < end, got {w}",
        )
    _check(
        t.sharpness_every is None or (t.compile is not True and t.distributed != "fsdp"),
        "train.sharpness_every: Hessian-vector products need eager, whole-tensor models; set "
        "train.compile=false and train.distributed=ddp, or remove train.sharpness_every",
    )


def _check_train(cfg: Config) -> None:
    t = cfg.train
    for key in ("max_samples", "max_tokens", "max_time_s", "eval_samples", "checkpoint_every"):
        v = getattr(t, key)
        _check(v is None or v > 0, f"train.{key}: must be > 0 or null, got {v}")
    _check(
        t.keep_checkpoints >= 1, f"train.keep_checkpoints: must be >= 1, got {t.keep_checkpoints}"
    )
    _check(
        0 < t.rollback_lr_factor <= 1,
        f"train.rollback_lr_factor: must be in (0, 1], got {t.rollback_lr_factor}",
    )
    _check(
        t.on_nonfinite != "rollback" or t.checkpoint_every is not None,
        "train.on_nonfinite: rollback needs train.checkpoint_every (a checkpoint to go back to)",
    )
    _check_inspection(t)
    _check(t.eval_every >= 1, f"train.eval_every: must be >= 1, got {t.eval_every}")
    _check(t.log_every >= 1, f"train.log_every: must be >= 1, got {t.log_every}")
    _check(
        t.clip_grad_norm is None or t.clip_grad_norm > 0,
        f"train.clip_grad_norm: must be > 0 or null, got {t.clip_grad_norm}",
    )
    _check(t.ema is None or 0 < t.ema < 1, f"train.ema: must be in (0, 1) or null, got {t.ema}")
    _check(
        t.lawa is None or (isinstance(t.lawa, int) and t.lawa >= 1),
        f"train.lawa: the number of snapshots to average, >= 1 or null; got {t.lawa!r}",
    )
    _check(
        t.lawa is None or t.distributed != "fsdp",
        "train.lawa: its snapshots are whole tensors, not FSDP2 shards; use train.ema under "
        "train.distributed=fsdp, or DDP",
    )
    if t.lawa is not None:
        try:
            lawa_every(cfg)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    _check(
        t.early_stop_patience is None or t.early_stop_patience >= 1,
        f"train.early_stop_patience: must be >= 1 or null, got {t.early_stop_patience}",
    )
    _check(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
        f"train.device: expected auto, cpu, cuda or cuda:N, got {t.device!r}",
    )
    _check(
        t.noise_scale_every is None or t.noise_scale_every >= 1,
        f"train.noise_scale_every: must be >= 1 or null, got {t.noise_scale_every}",
    )
    _check(t.dist_timeout_s > 0, f"train.dist_timeout_s: must be > 0, got {t.dist_timeout_s}")
    _check(t.threads is None or t.threads >= 1, f"train.threads: must be >= 1, got {t.threads}")


def _check_data(cfg: Config) -> None:
    """The data loaders' own rules (cadence.data.checks), before any data is read."""
    d = cfg.data
    try:
        if d.val_fraction is not None:
            check_val_fraction(d.val_fraction)
        check_max_bytes(d.max_bytes)
        check_tokenizer(d.tokenizer, d.vocab_size)
        if d.path is not None and cfg.workload == "asr":
            raise ValueError(
                "data.path: workload asr trains on synthetic digit strings only; drop data.path "
                "(workload speech takes a folder of recordings)"
            )
        if d.path is not None and cfg.workload == "speech":
            check_text_path(d.path, "a folder of label folders of .wav files (DIR/<label>/*.wav)")
        elif d.path is not None:
            check_text_path(d.path)
        if d.voices is not None and not 1 <= d.voices <= 160:
            raise ValueError(f"data.voices: must be in 1..160 or null, got {d.voices}")
        if d.sampling == "random" and cfg.workload != "lm":
            raise ValueError(
                f"data.sampling: random windows of a token stream are for the lm workload, "
                f"not {cfg.workload!r}; use packed"
            )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
