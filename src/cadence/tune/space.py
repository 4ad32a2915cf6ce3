"""Search spaces for `cadence tune` and compare's tuning: dotted config keys -> distributions.

Read from a ``search:`` section of the config YAML or from a separate file (``--space``)::

    optimizer.lr: {low: 1.0e-4, high: 1.0, log: true}     # float (log-uniform)
    optimizer.weight_decay: {low: 0.0, high: 0.1}          # float (uniform)
    schedule.warmup: {low: 0, high: 100, type: int}        # integer
    optimizer.name: [sgd, adamw]                           # categorical (a list is shorthand)
    optimizer.betas: {choices: [[0.9, 0.999], [0.9, 0.95]]}

A bad space is refused before any trial runs, with a one-line ``ConfigError`` naming the key:
every edge value of every parameter must make a valid config on its own.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cadence.config import Config, ConfigError, config_from_dict, parse_config, yaml_load
from cadence.workloads import check_config

if TYPE_CHECKING:
    import optuna

__all__ = ["Param", "apply_params", "load_space", "parse_space", "split_search_section"]


@dataclass(frozen=True)
class Param:
    """One searched config key: a float/int range or a list of choices."""

    key: str  # dotted config key, e.g. optimizer.lr
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        """Ask the trial for a value; list-valued choices travel as their index (Optuna stores
        only scalars) and come back as the list."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            step = int(self.step) if self.step else 1
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=step, log=self.log
            )
        if all(_scalar(c) for c in self.choices):
            return trial.suggest_categorical(self.key, list(self.choices))
        i = trial.suggest_categorical(self.key, list(range(len(self.choices))))
        return self.choices[i]

    def decode(self, value: Any) -> Any:
        """A stored trial value back to the config value (undoes the index encoding)."""
        if self.kind == "categorical" and not all(_scalar(c) for c in self.choices):
            return self.choices[int(value)]
        return value

    def samples(self) -> list[Any]:
        """Values at the edges of the space, checked against the config before any trial."""
        if self.kind == "categorical":
            return list(self.choices)
        return [self.low, self.high]


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return value


_SPEC_KEYS = {"type", "low", "high", "log", "step", "choices"}


def _parse_param(key: str, spec: Any) -> Param:
    where = f"search.{key}"
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where}: expected a list of choices or a mapping such as "
            "{low: 1.0e-4, high: 1.0, log: true}, got " + repr(spec)
        )
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown; allowed: {', '.join(sorted(_SPEC_KEYS))}"
        )
    if "choices" in spec:
        kind = spec.get("type", "categorical")
        choices = spec["choices"]
        if kind != "categorical" or set(spec) - {"choices", "type"}:
            raise ConfigError(f"{where}: 'choices' cannot be combined with low/high/log/step")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices: expected a non-empty list, got {choices!r}")
        return Param(key, "categorical", choices=tuple(_freeze(c) for c in choices))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: a range needs both low and high (or give choices)")
    low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
    is_int = isinstance(spec["low"], int) and isinstance(spec["high"], int)
    kind = spec.get("type", "int" if is_int and not spec.get("log") else "float")
    if kind not in ("float", "int"):
        raise ConfigError(f"{where}.type: expected float, int or categorical, got {kind!r}")
    if not low < high:
        raise ConfigError(f"{where}: need low < high, got low={low} and high={high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: expected true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got low={low}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, f"{where}.step")
        if step <= 0:
            raise ConfigError(f"{where}.step: must be > 0, got {step}")
        if log:
            raise ConfigError(f"{where}: step and log cannot be combined")
    if kind == "int":
        if low != int(low) or high != int(high):
            raise ConfigError(f"{where}: an int range needs integer low and high")
        if step is not None and step != int(step):
            raise ConfigError(f"{where}.step: an int range needs an integer step, got {step}")
    return Param(key, kind, float(low), float(high), log, step)


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def thaw(v: Any) -> Any:
    return [thaw(x) for x in v] if isinstance(v, tuple) else v


def _config_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted config key -> its annotation (to reject typos before any trial runs)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_config_keys(tp, key + "."))
        else:
            out[key] = tp
    return out


def parse_space(space: Any, base: Config | None = None) -> list[Param]:
    """Validate a search-space mapping into ``Param`` s; with ``base``, also check that every
    edge value of every parameter makes a valid config on its own."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(
            "search: expected a non-empty mapping of config keys to ranges, e.g. "
            "optimizer.lr: {low: 1.0e-4, high: 1.0, log: true}"
        )
    keys = _config_keys()
    params = []
    for key, spec in _flatten_space(space).items():
        if key not in keys:
            close = [k for k in keys if k.split(".")[-1] == key.split(".")[-1]]
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"search.{key}: not a config key{hint}")
        params.append(_parse_param(key, spec))
    if base is not None:
        for p in params:
            for value in p.samples():
                try:
                    apply_params(base, {p.key: thaw(value)})
                except ConfigError as exc:
                    raise ConfigError(
                        f"search.{p.key}: value {value!r} is invalid: {exc}"
                    ) from None
    return params


def _flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Accept both ``optimizer.lr: ...`` and a section ``optimizer: {lr: ...}`` (one level)."""
    out: dict[str, Any] = {}
    for k, v in space.items():
        key = f"{prefix}{k}"
        if not prefix and "." not in key and isinstance(v, dict) and not (set(v) & _SPEC_KEYS):
            out.update(_flatten_space(v, key + "."))
        else:
            out[key] = v
    return out


def load_space(path: str | Path) -> dict[str, Any]:
    """Read a search-space YAML file (a mapping, or a mapping under ``search:``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--space {path}: file not found")
    try:
        data = yaml_load(p.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"--space {path}: invalid YAML; fix the syntax") from None
    if isinstance(data, dict) and set(data) == {"search"}:
        data = data["search"]
    if not isinstance(data, dict):
        raise ConfigError(f"--space {path}: expected a mapping of config keys to ranges")
    return data


def split_search_section(
    config: str | Path | None, overrides: Sequence[str], tmp_dir: Path
) -> tuple[Config, dict[str, Any] | None]:
    """Load CONFIG (recipe or YAML) + overrides; a ``search:`` section in a YAML file is taken
    out first (``load_config`` would reject it as an unknown key) and returned separately."""

    path = Path(str(config)) if config is not None else None
    if path is None or not path.is_file():
        return _load(config, overrides), None
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError:
        data = None  # load_config reports the syntax error with its line
    if not isinstance(data, dict) or "search" not in data:
        return _load(config, overrides), None
    space = data.pop("search")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    stripped = tmp_dir / path.name
    stripped.write_text(yaml.safe_dump(data, sort_keys=False))
    return _load(stripped, overrides), space


def _load(config: str | Path | None, overrides: Sequence[str]) -> Config:
    cfg = parse_config(config, overrides)
    check_config(cfg)
    return cfg


def apply_params(base: Config, values: dict[str, Any]) -> Config:
    """A validated copy of ``base`` with dotted keys set (raises ConfigError if invalid)."""
    data = copy.deepcopy(base.to_dict())
    for key, value in values.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = thaw(value)
    cfg = config_from_dict(data)
    check_config(cfg)
    return cfg
