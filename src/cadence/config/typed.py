"""Typed loading: a nested mapping (YAML) checked against the config dataclasses' annotations.

Written by hand because the rules are few and exact: ints widen to floats and nothing else
converts (``batch.size: 3.5`` is an error, not 3), non-finite floats are refused, and every
error names the dotted key it came from.

Besides the config, other files with a fixed shape are read the same way (a comparison spec):
``dict[str, Entry]`` holds named entries, each checked as ``KEY.NAME``; ``Any`` is a value this
module does not own (another reader checks it); a field without a default is required.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from cadence.config.schema import ConfigError


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


_SCALAR_CHECKS: dict[Any, Any] = {
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    str: lambda v: isinstance(v, str),
}


def _takes_mapping(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build_typed(tp, value, key)
    if origin in (Union, types.UnionType):
        mapping_arms = [a for a in typing.get_args(tp) if _takes_mapping(a)]
        if isinstance(value, dict) and len(mapping_arms) == 1:
            # a mapping can only be meant as that arm, so its own error, which names the key
            # inside the mapping, says more than "expected mapping | null"
            return _coerce(value, mapping_arms[0], key)
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
    if origin is dict:
        # A free-form mapping handed to a library as is (model.hf_config -> transformers) is
        # dict[str, Any]: its keys are that library's, so only the shape is checked here.
        # dict[str, Entry] is a mapping of named entries, each checked as KEY.NAME.
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping of names to values, got {value!r}")
        item = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return {k: _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if _SCALAR_CHECKS.get(tp, lambda v: False)(value):
        return float(value) if tp is float else value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def build_typed(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """`cls(**data)` with every value checked against its annotation, recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(str(k) for k in set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key; allowed keys here: {', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.init and f.name not in kwargs:
            key = f"{prefix}.{f.name}" if prefix else f.name
            raise ConfigError(
                f"{key}: required key is missing; expected {_type_name(hints[f.name])}"
            )
    return cls(**kwargs)
