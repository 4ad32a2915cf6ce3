"""The config a run uses: the config layer's rules, then its workload's.

`cadence.config.parse_config` checks what the config itself knows; `cadence.workloads` knows
which workloads exist and what they accept. A run needs both before anything is written, so
`load_config` (the public ``cadence.load_config``) runs both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cadence.config import Config, parse_config
from cadence.workloads import check_config


def load_config(recipe_or_path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """A validated ``Config`` from a recipe name or YAML path plus ``KEY=VALUE`` overrides.

    Raises ``ConfigError`` with one line naming the key and what would fix it.
    """
    cfg = parse_config(recipe_or_path, overrides)
    check_config(cfg)
    return cfg
