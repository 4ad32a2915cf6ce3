"""Recipes and YAML files plus ``--set`` overrides -> a validated ``Config``.

This layer knows the config's own rules and the rules of the builders below it (optimizers,
schedules); whether a config fits its *workload* (a known name, an architecture it has) is
checked one layer up, by ``cadence.workloads.check_config``. ``cadence.load_config`` runs both.
"""

from __future__ import annotations

import importlib.resources
import re
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml

from cadence.config.schema import Config, ConfigError, ConfigWarning
from cadence.config.typed import build_typed
from cadence.config.validate import validate


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


def read_source(recipe_or_path: str | Path | None) -> tuple[dict[str, Any], str]:
    """The raw mapping of a recipe or YAML file (before defaults and checks), and its name."""
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


# ---------------------------------------------------------------- building


def parse_config(
    recipe_or_path: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> Config:
    """A ``Config`` from a recipe name or YAML path plus ``KEY=VALUE`` overrides, checked
    against the config's own rules and its builders' (not yet against its workload)."""
    data, _ = read_source(recipe_or_path)
    warmup, steps = _raw_int(data, "schedule", "warmup"), _raw_int(data, "train", "max_steps")
    warmup_fits_file = warmup is not None and steps is not None and warmup < steps
    overridden = set()
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(data, parts, value)
        overridden.add(".".join(parts))
    cfg = build_typed(Config, data)
    if warmup_fits_file and "train.max_steps" in overridden and "schedule.warmup" not in overridden:
        _clamp_warmup(cfg)
    validate(cfg)
    return cfg


def _raw_int(data: dict[str, Any], section: str, key: str) -> int | None:
    """An integer of the raw mapping (or its schema default); None for anything else."""
    default = getattr(getattr(Config(), section), key)
    sec = data.get(section)
    value = sec.get(key, default) if isinstance(sec, dict) else default
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _clamp_warmup(cfg: Config) -> None:
    """A recipe's warmup in steps that an override of train.max_steps made longer than the
    run: a quick smoke run should work, so it is shortened with a warning, not refused."""
    s, t = cfg.schedule, cfg.train
    if isinstance(s.warmup, int) and t.max_steps >= 1 and s.warmup >= t.max_steps:
        clamped = t.max_steps - 1
        warnings.warn(
            f"schedule.warmup: {s.warmup} steps is not shorter than train.max_steps="
            f"{t.max_steps}; warming up for {clamped} steps instead (give the warmup as a "
            "fraction, e.g. schedule.warmup=0.1, to scale it with the run)",
            ConfigWarning,
            stacklevel=3,
        )
        s.warmup = clamped


def config_from_dict(data: dict[str, Any]) -> Config:
    """A ``Config`` from a full nested mapping (``Config.to_dict()``), checked like
    ``parse_config``."""
    cfg = build_typed(Config, data)
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
