"""``cadence inspect RUN_DIR``: what a run did and why, as a page and a few lines."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="explain what a run did and why: RUN_DIR/inspect.html (loss, spikes, per-layer "
        "update ratios, sharpness) and a plain-language account",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    from cadence.run.inspection import write_inspection

    page, lines = write_inspection(args.run_dir)
    for line in lines:
        console.print(f"- {line}", highlight=False, markup=False)
    console.print(f"wrote {page}", highlight=False, markup=False)
    return 0
