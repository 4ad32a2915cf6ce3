"""Arguments several commands share (CONFIG and --set)."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        help="a YAML file or a built-in recipe name (see `cadence list recipes`); default: default",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set optimizer.lr=0.1 (repeatable)",
    )
