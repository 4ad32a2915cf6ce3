"""Every config key with its default and what it does, for ``cadence list keys``.

The descriptions are the comments beside (or just above) each field in schema.py: one place
says what a key means, read by people in the source and by the CLI here.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re

from cadence.config.schema import Config

_FIELD = re.compile(r"^    (\w+)\s*:")  # a field of a dataclass body (4 spaces in)


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its comment: the ``# ...`` lines right above it, the one beside it, and
    those beside its continuation lines (a default written over several lines)."""
    notes: dict[str, list[str]] = {}
    above: list[str] = []
    current: str | None = None
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        beside = [line.split("  # ", 1)[1].strip()] if "  # " in line else []
        match = _FIELD.match(line)
        if match and not stripped.startswith(("def ", "@")):
            current = match.group(1)
            notes[current] = [*above, *beside]
        elif current is not None and (line.startswith("     ") or stripped[:1] in ")]}"):
            notes[current] += beside
        else:
            current = None
        above = []
    return {name: " ".join(parts) for name, parts in notes.items()}


def _shown(value: object) -> str:
    """A default as YAML writes it (null, true, 'text' as text)."""
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value


def config_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every key, in the order the schema has them."""
    rows: list[tuple[str, str, str]] = []
    top = _comments(Config)
    for section in dataclasses.fields(Config):
        default = getattr(Config(), section.name)
        if not dataclasses.is_dataclass(default):
            rows.append((section.name, _shown(default), top.get(section.name, "")))
            continue
        notes = _comments(type(default))
        for f in dataclasses.fields(default):
            value = getattr(default, f.name)
            if dataclasses.is_dataclass(value):  # a nested section (model.peft)
                inner = _comments(type(value))
                for g in dataclasses.fields(value):
                    key = f"{section.name}.{f.name}.{g.name}"
                    rows.append((key, _shown(getattr(value, g.name)), inner.get(g.name, "")))
                continue
            rows.append((f"{section.name}.{f.name}", _shown(value), notes.get(f.name, "")))
    return rows
