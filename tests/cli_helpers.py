"""Running the `cadence` CLI as a child process from tests: argument lists and environment.

Shared by tests/integration and tests/distributed (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable


def as_sets(overrides: Iterable[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]``."""
    out: list[str] = []
    for item in overrides:
        out += ["--set", item]
    return out


def cli_env() -> dict[str, str]:
    """This environment, unbuffered, and never a torchrun WORLD_SIZE the child would obey."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("WORLD_SIZE", None)
    return env


def cadence_cmd(*args: str) -> list[str]:
    """``python -m cadence ARGS`` with this interpreter."""
    return [sys.executable, "-m", "cadence", *args]
