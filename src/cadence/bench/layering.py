"""One run's config from a comparison spec's layers, later wins.

``defaults`` -> the workload's ``set`` -> the strategy's ``base`` (a recipe or YAML file) -> the
strategy's ``set`` -> its ``per_workload`` entry -> the tuning point -> the run control the
comparison owns (workload, target, budgets, seed, one thread, no progress). Apart from
spec.py because reading a spec and layering one run's config are separate concerns: the plan
and the report build configs without re-reading YAML.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cadence.config import Config, ConfigError, config_from_dict
from cadence.workloads import check_config

if TYPE_CHECKING:
    from cadence.bench.spec import Spec, StrategySpec, WorkloadEntry

__all__ = ["build_config"]


def _set_dotted(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _get_dotted(data: dict[str, Any], key: str) -> Any:
    """The value a dotted key has so far, or the config default when no layer set it."""
    from cadence.config import Config, flatten

    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return flatten(Config().to_dict()).get(key)
        node = node[part]
    return node


def _base_data(base: str | None, where: str) -> dict[str, Any]:
    if base is None:
        return {}
    from cadence.config import read_source  # raw YAML of a recipe/file, before defaults

    try:
        data, _ = read_source(base)
    except ConfigError as exc:
        raise ConfigError(f"{where}.base: {exc}") from None
    return data


def build_config(
    spec: Spec,
    strategy: StrategySpec,
    entry: WorkloadEntry,
    seed: int,
    params: dict[str, Any],
) -> Config:
    """The validated config of one run (see the module docstring for the layering)."""
    where = f"strategies.{strategy.name}"
    data: dict[str, Any] = {}
    layers: list[tuple[str, dict[str, Any]]] = [
        ("defaults", spec.defaults),
        (f"workloads.{entry.name}.set", entry.overrides),
    ]
    for name, layer in layers:
        for k, v in layer.items():
            _set_dotted(data, k, v, name)
    base = _base_data(strategy.base, where)
    for section, value in base.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    later = [
        (f"{where}.set", strategy.overrides),
        (f"{where}.per_workload.{entry.name}", strategy.per_workload.get(entry.name, {})),
        (f"{where}.tune", params),
        (
            "run control",
            {
                "workload": entry.workload,
                "train.target": entry.target,
                "train.stop_at_target": True,
                "train.max_steps": entry.max_steps,
                "train.max_time_s": entry.max_time_s,
                "train.seed": seed,
                "train.threads": 1,
                "train.progress": False,
            },
        ),
    ]
    for name, layer in later:
        for k, v in layer.items():
            if isinstance(v, dict) and "scale" in v:  # relative tuning: x factor of the value
                current = _get_dotted(data, k)
                if not isinstance(current, (int, float)) or isinstance(current, bool):
                    raise ConfigError(f"{name}.{k}: scale needs a numeric value, got {current!r}")
                v = current * v["scale"]
            _set_dotted(data, k, v, name)
    try:
        cfg = config_from_dict(data)
        check_config(cfg)
        return cfg
    except ConfigError as exc:
        raise ConfigError(f"{where} on {entry.name}: {exc}") from None
