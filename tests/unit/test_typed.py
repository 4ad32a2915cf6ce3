"""The typed loader beyond the config: named entries, free-form values, required keys, and errors
that still name the innermost key (a comparison spec is read this way)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from cadence.config import ConfigError
from cadence.config.typed import build_typed


@dataclass
class Entry:
    target: float  # required: no default
    steps: int = 1
    set: dict[str, Any] | None = None


@dataclass
class Options:
    by: str = "cpu"


@dataclass
class File:
    entries: dict[str, Entry] = field(default_factory=dict)
    maybe: dict[str, Entry | None] = field(default_factory=dict)
    options: Options | None = None
    free: dict[str, Any] = field(default_factory=dict)
    per: dict[str, dict[str, Any] | None] | None = None


def test_named_entries_are_built_and_free_form_values_pass_through() -> None:
    got = build_typed(
        File,
        {
            "entries": {"a": {"target": 1, "set": {"x.y": [1, {"z": None}]}}},
            "maybe": {"b": None, "c": {"target": 0.5}},
            "options": {"by": "time"},
            "free": {"k": object},
            "per": {"a": None, "b": {"q": 1}},
        },
    )
    assert got.entries == {"a": Entry(target=1.0, set={"x.y": [1, {"z": None}]})}
    assert isinstance(got.entries["a"].target, float)  # ints widen, as in the config
    assert got.maybe == {"b": None, "c": Entry(target=0.5)}
    assert got.options == Options(by="time") and got.free == {"k": object}
    assert got.per == {"a": None, "b": {"q": 1}}
    assert build_typed(File, {"options": None}).options is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"entries": {"a": {}}}, "entries.a.target: required key is missing; expected float"),
        ({"entries": {"a": {"target": "x"}}}, "entries.a.target: expected float, got 'x'"),
        ({"entries": {"a": {"target": 1, "stepz": 2}}}, "entries.a.stepz: unknown key"),
        ({"entries": {"a": None}}, "entries.a: expected a mapping, got None"),
        ({"entries": [1]}, "entries: expected a mapping of names to values"),
        ({"maybe": {"b": {"target": 1, "steps": 1.5}}}, "maybe.b.steps: expected int"),
        ({"maybe": {"b": 3}}, "maybe.b: expected mapping | null, got 3"),
        ({"options": {"bye": 1}}, "options.bye: unknown key; allowed keys here: by"),
        ({"per": {"a": [1]}}, r"per.a: expected mapping \| null, got \[1\]"),
        ({1: 2, "zz": 3}, "^1: unknown key"),  # keys YAML reads as ints are named, not a crash
    ],
)
def test_each_error_is_one_line_naming_the_innermost_key(data: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_typed(File, data)
    assert "\n" not in str(info.value)
