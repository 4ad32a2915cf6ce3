"""The `cadence` command line: every command's argument parsing, in one place."""

from cadence.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
