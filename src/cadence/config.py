"""Typed, documented configuration: YAML recipes + ``--set`` overrides -> a validated ``Config``.

Every field has a default and a one-line comment. A bad value is rejected when the config is built,
with a ``ConfigError`` whose one-line message names the dotted key and what is allowed, so the CLI
can print it and exit 2 before anything is written to disk.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads `3e-4` as a string; users write LRs that way, so accept the
    YAML 1.2 float forms too."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Safe YAML with the YAML 1.2 float forms (`3e-4`), for every file cadence reads."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A user error in a config: the message names the key and what would fix it.

    The message is always one line: user text echoed into it (a key, a --set value) has its line
    breaks escaped, so the CLI's error stays a single line whatever was typed.
    """

    def __init__(self, message: str) -> None:
        super().__init__("\\n".join(str(message).splitlines()) or str(message))


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # see `cadence list optimizers`
    lr: float | Literal["auto"] = 3e-3  # base (peak) LR; 'auto' runs the LR range test first
    momentum: float = 0.0  # heavy-ball momentum (sgd, muon, schedulefree-sgd); 0 = library default
    nesterov: bool = False  # Nesterov momentum for sgd (needs momentum > 0)
    weight_decay: float = (
        0.0  # decoupled for adamw/lion/muon; never applied to norms/biases/embeddings
    )
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam-family and lion betas
    eps: float = 1e-8  # adam-family epsilon
    aux_lr: float | None = None  # lr of the AdamW part of muon (embeddings, head, norms); null = lr


@dataclass
class ScheduleConfig:
    name: str = "constant"  # see `cadence list schedules`
    warmup: int = 0  # linear warmup steps in front of the schedule
    gamma: float = 0.1  # decay factor for exponential / step / multistep
    per: Literal["step", "epoch"] = "step"  # exponential decay applies gamma per step or per epoch
    step_size: int | None = (
        None  # step schedule: decay every step_size steps (null = max_steps // 3)
    )
    milestones: list[int] = field(default_factory=list)  # multistep: steps at which lr *= gamma
    min_lr_ratio: float = 0.0  # floor of cosine/linear/polynomial/wsd as a fraction of lr
    decay_fraction: float = 0.2  # wsd: fraction of training spent in the cooldown
    cooldown: Literal["linear", "1-sqrt", "cosine"] = "linear"  # wsd cooldown shape
    power: float = 1.0  # polynomial decay power
    timescale: int | None = None  # inverse-sqrt: steps before the 1/sqrt decay starts
    pct_start: float = 0.3  # onecycle: fraction of steps spent increasing the lr


@dataclass
class PlateauConfig:
    enabled: bool = False  # loss-driven lr reduction, composed with the schedule
    monitor: Literal["val_loss", "train_loss"] = "val_loss"  # train_loss is EMA-smoothed
    patience: int = 3  # evaluations without improvement before reducing
    factor: float = 0.5  # multiply the lr by this on a plateau
    threshold: float = 1e-3  # relative improvement that counts as better
    cooldown: int = 0  # evaluations to wait after a reduction
    min_scale: float = 1e-3  # floor of the plateau multiplier


@dataclass
class BatchConfig:
    size: int | Literal["full"] = 32  # global batch in samples, or 'full' for full-batch GD
    micro_size: int | None = None  # micro-batch that fits in memory; gradients accumulate to `size`
    schedule: list[list[float]] = field(default_factory=list)  # ramp: [[fraction, size], ...]
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"  # lr rule when the batch ramps up


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps; also the horizon of the lr schedule
    max_samples: int | None = None  # stop after this many training samples
    max_tokens: int | None = None  # stop after this many training tokens (lm)
    max_time_s: float | None = None  # stop after this much wall time
    eval_every: int = 100  # evaluate every N steps (and at the end)
    eval_samples: int | None = 512  # cap on validation samples per evaluation (null = all)
    log_every: int = 10  # write a metrics row every N steps
    seed: int = 0  # seeds model init and data order
    target: float | None = None  # stop when the validation metric reaches this (see list workloads)
    stop_at_target: bool = True  # false: record the step the target was reached but keep training
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast for forward/backward
    clip_grad_norm: float | None = None  # clip the global gradient norm to this
    checkpoint_every: int | None = None  # save a checkpoint every N steps (always at the end)
    keep_checkpoints: int = 3  # keep the newest N checkpoints (plus the best by the metric)
    on_nonfinite: Literal["stop", "skip", "rollback"] = "stop"  # policy for a NaN/inf step
    rollback_lr_factor: float = 0.5  # rollback: multiply the LR by this after each reload
    compile: bool = False  # torch.compile the model
    ema: float | None = None  # EMA decay of weights (e.g. 0.999); evaluated as ema_val_loss
    early_stop_patience: int | None = None  # stop after N evaluations without a better metric
    tol_grad_norm: float | None = None  # convergence: stop when the gradient norm falls below
    tol_rel_loss: float | None = None  # convergence: stop when |dL|/|L| between steps falls below
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"  # under torchrun: auto = ddp
    dist_timeout_s: float = 300.0  # a collective waiting longer (a dead rank) fails the run
    threads: int | None = None  # torch intra-op threads (null = torch's default)
    progress: bool = True  # show a progress bar
    log_noise_scale: bool = False  # measure the gradient noise scale (critical batch) as it trains
    noise_scale_every: int | None = None  # steps between measurements (null = eval_every)


@dataclass
class DataConfig:
    path: str | None = None  # text file/folder for lm (null = the installed sympy sources)
    tokenizer: Literal["byte", "bpe"] = "byte"  # lm tokenizer; bpe is trained on the train split
    vocab_size: int = 1024  # bpe vocabulary size
    max_bytes: int | None = 4_000_000  # read at most this much text (null = all)
    val_fraction: float = 0.05  # fraction of the data held out for validation


@dataclass
class ModelConfig:
    arch: str | None = None  # lm: gpt; mnist: cnn | mlp; digits: mlp; logreg: linear
    n_layer: int = 4  # gpt blocks
    n_head: int = 4  # gpt attention heads
    d_model: int = 128  # gpt width
    seq_len: int = 128  # gpt context length
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"  # gpt normalisation
    tie_embeddings: bool = True  # gpt: share the embedding and output head
    dropout: float = 0.0  # gpt dropout
    hidden: list[int] = field(default_factory=lambda: [128])  # mlp hidden widths
    l2: float = 1e-3  # logreg: L2 penalty in the objective (keeps the optimum finite)


@dataclass
class Config:
    workload: str = "lm"  # see `cadence list workloads`
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    plateau: PlateauConfig = field(default_factory=PlateauConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- typed loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_SCALAR_CHECKS: dict[Any, Any] = {
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    str: lambda v: isinstance(v, str),
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if _SCALAR_CHECKS.get(tp, lambda v: False)(value):
        return float(value) if tp is float else value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key; allowed keys here: {', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optimizer.lr=0.1'`` -> (['optimizer', 'lr'], 0.1); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optimizer.lr=0.1")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected a dotted key such as optimizer.lr")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {parts[-1]}"
            )
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------- recipes


def recipe_names() -> list[str]:
    root = importlib.resources.files("cadence") / "recipes"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def recipe_description(name: str) -> str:
    """The first comment line of a recipe file, shown by `cadence list recipes`."""
    text = (importlib.resources.files("cadence") / "recipes" / f"{name}.yaml").read_text()
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _read_source(recipe_or_path: str | Path | None) -> tuple[dict[str, Any], str]:
    if recipe_or_path is None:
        recipe_or_path = "default"
    src = str(recipe_or_path)
    path = Path(src)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{src}: config file not found; give a YAML file or a recipe name")
        text = path.read_text()
        name = path.stem
    elif src in recipe_names():
        text = (importlib.resources.files("cadence") / "recipes" / f"{src}.yaml").read_text()
        name = src
    else:
        raise ConfigError(
            f"{src}: not a file and not a recipe; recipes: {', '.join(recipe_names())}"
        )
    try:
        data = yaml_load(text) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{src}: invalid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: a config must be a YAML mapping of sections")
    data.pop("description", None)
    return data, name


def load_config(
    recipe_or_path: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> Config:
    """Build a validated ``Config`` from a recipe name or YAML path plus ``KEY=VALUE`` overrides."""
    data, _ = _read_source(recipe_or_path)
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(data, parts, value)
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: dotted keys, as users write them in --set."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- validation


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Range and cross-field checks; names and registries are checked where they are built."""
    from cadence.optim import OPTIMIZERS
    from cadence.schedules import SCHEDULES
    from cadence.workloads import WORKLOADS

    _check(
        cfg.workload in WORKLOADS,
        f"workload: unknown workload {cfg.workload!r}; choose one of: {', '.join(WORKLOADS)}",
    )
    o, s, p, b, t, d, m = (
        cfg.optimizer,
        cfg.schedule,
        cfg.plateau,
        cfg.batch,
        cfg.train,
        cfg.data,
        cfg.model,
    )
    _check(
        o.name in OPTIMIZERS,
        f"optimizer.name: unknown optimizer {o.name!r}; choose one of: {', '.join(OPTIMIZERS)}",
    )
    _check(o.lr == "auto" or o.lr > 0, f"optimizer.lr: must be > 0 or 'auto', got {o.lr}")
    _check(o.aux_lr is None or o.aux_lr > 0, f"optimizer.aux_lr: must be > 0, got {o.aux_lr}")
    _check(0 <= o.momentum < 1, f"optimizer.momentum: must be in [0, 1), got {o.momentum}")
    _check(o.weight_decay >= 0, f"optimizer.weight_decay: must be >= 0, got {o.weight_decay}")
    _check(
        len(o.betas) == 2 and all(0 <= x < 1 for x in o.betas),
        f"optimizer.betas: must be two numbers in [0, 1), got {o.betas}",
    )
    _check(o.eps > 0, f"optimizer.eps: must be > 0, got {o.eps}")
    _check(
        not (o.nesterov and o.momentum == 0 and o.name == "sgd"),
        "optimizer.nesterov: needs optimizer.momentum > 0",
    )
    _check(
        s.name in SCHEDULES,
        f"schedule.name: unknown schedule {s.name!r}; choose one of: {', '.join(SCHEDULES)}",
    )
    _check(t.max_steps >= 1, f"train.max_steps: must be >= 1, got {t.max_steps}")
    _check(
        0 <= s.warmup < t.max_steps,
        f"schedule.warmup: must be in [0, train.max_steps), got {s.warmup}",
    )
    _check(0 < p.factor < 1, f"plateau.factor: must be in (0, 1), got {p.factor}")
    _check(p.patience >= 0, f"plateau.patience: must be >= 0, got {p.patience}")
    _check(p.cooldown >= 0, f"plateau.cooldown: must be >= 0, got {p.cooldown}")
    _check(0 <= p.min_scale <= 1, f"plateau.min_scale: must be in [0, 1], got {p.min_scale}")
    _check(p.threshold >= 0, f"plateau.threshold: must be >= 0, got {p.threshold}")
    if b.size != "full":
        _check(b.size >= 1, f"batch.size: must be a positive integer or 'full', got {b.size}")
    _check(
        b.micro_size is None or b.micro_size >= 1,
        f"batch.micro_size: must be a positive integer or null, got {b.micro_size}",
    )
    if b.schedule:
        _check(b.size != "full", "batch.schedule: a batch ramp needs an integer batch.size")
        for i, stage in enumerate(b.schedule):
            _check(
                len(stage) == 2
                and 0 <= stage[0] < 1
                and stage[1] >= 1
                and stage[1] == int(stage[1]),
                f"batch.schedule[{i}]: expected [fraction in [0, 1), size >= 1], got {stage}",
            )
    full_batch = OPTIMIZERS[o.name].full_batch
    _check(
        not full_batch or b.size == "full",
        f"batch.size: optimizer {o.name!r} is full-batch gradient descent; set batch.size=full",
    )
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
    _check(t.eval_every >= 1, f"train.eval_every: must be >= 1, got {t.eval_every}")
    _check(t.log_every >= 1, f"train.log_every: must be >= 1, got {t.log_every}")
    _check(
        t.clip_grad_norm is None or t.clip_grad_norm > 0,
        f"train.clip_grad_norm: must be > 0 or null, got {t.clip_grad_norm}",
    )
    _check(t.ema is None or 0 < t.ema < 1, f"train.ema: must be in (0, 1) or null, got {t.ema}")
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
    _check(0 < d.val_fraction < 1, f"data.val_fraction: must be in (0, 1), got {d.val_fraction}")
    _check(d.vocab_size >= 257, f"data.vocab_size: must be >= 257, got {d.vocab_size}")
    _check(
        d.max_bytes is None or d.max_bytes > 0,
        f"data.max_bytes: must be > 0 or null, got {d.max_bytes}",
    )
    if d.path is not None:
        _check(
            Path(d.path).expanduser().exists(),
            f"data.path: {d.path} does not exist; point it at a text file or folder",
        )
    for key in ("n_layer", "n_head", "d_model", "seq_len"):
        _check(getattr(m, key) >= 1, f"model.{key}: must be >= 1, got {getattr(m, key)}")
    _check(
        m.d_model % m.n_head == 0,
        f"model.d_model: must be divisible by model.n_head ({m.n_head}), got {m.d_model}",
    )
    _check(0 <= m.dropout < 1, f"model.dropout: must be in [0, 1), got {m.dropout}")
    _check(all(h >= 1 for h in m.hidden), f"model.hidden: widths must be >= 1, got {m.hidden}")
    _check(m.l2 >= 0, f"model.l2: must be >= 0, got {m.l2}")
    WORKLOADS[cfg.workload].check(cfg)
    _check_buildable(cfg)


def _check_buildable(cfg: Config) -> None:
    """Build the optimizer (on a throwaway model), schedule, plateau and batch ramp once, so their
    own argument checks reject a bad config here, before any data is loaded or file written."""
    from torch import nn

    from cadence.schedules import split_micro
    from cadence.training.components import (
        batch_ramp_from,
        lr_schedule_from,
        optimizer_from,
        plateau_from,
    )

    try:
        optimizer_from(cfg, nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)))
        lr_schedule_from(cfg)
        plateau_from(cfg)
        if cfg.batch.size != "full":
            batch_ramp_from(cfg, n_train=1)
            split_micro(int(cfg.batch.size), cfg.batch.micro_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
