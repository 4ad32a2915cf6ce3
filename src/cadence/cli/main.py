"""The `cadence` command: parse -> build -> run. No training logic lives here.

All argument parsing of every command lives in this package (`cadence.cli`): train.py, tune.py
(find-lr, find-batch, tune), compare.py, deploy.py (export, generate, serve), prepare.py
(prepare-data), inspect_run.py (inspect) and explain.py (explain) each register their subcommands and call the library; this module assembles them,
maps user errors to one line and exit status 2, and prints config warnings as one line each.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.table import Table

from cadence.cli.args import add_config_args
from cadence.cli.compare import add_parsers as add_compare_parsers
from cadence.cli.deploy import add_parsers as add_deploy_parsers
from cadence.cli.explain import add_parser as add_explain_parser
from cadence.cli.inspect_run import add_parser as add_inspect_parser
from cadence.cli.prepare import add_parsers as add_prepare_parsers
from cadence.cli.train import add_cooldown_parser, cmd_train
from cadence.cli.tune import add_parsers as add_tune_parsers


def _user_errors() -> tuple[type[BaseException], ...]:
    from cadence.config import ConfigError
    from cadence.data import DataError

    return (ConfigError, DataError)


def _distributed_errors() -> tuple[type[BaseException], ...]:
    import torch.distributed as dist

    errors: tuple[type[BaseException], ...] = ()
    for name in ("DistError", "DistBackendError", "DistNetworkError"):
        if hasattr(dist, name):
            errors += (getattr(dist, name),)
    return errors


def _transport_error(exc: RuntimeError) -> bool:
    """gloo reports a peer that died mid-collective as a plain RuntimeError from its TCP
    transport ("Connection reset by peer", "Connection closed by peer"), not as a DistError."""
    text = str(exc)
    return "gloo/transport" in text or "Connection closed by peer" in text


def _lost_group(exc: BaseException) -> int:
    """Another process of the group died or timed out: one line, not N tracebacks. Exit 1, so
    torchrun restarts the job when --max-restarts allows (it then resumes by itself)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    rank = os.environ.get("RANK", "?")
    print(f"cadence: error: rank {rank} lost the process group ({first[:200]})", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cadence",
        description="Train PyTorch models with principled training strategies and optimizers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a recipe or YAML config")
    add_config_args(p)
    p.add_argument(
        "--run-dir", default=None, help="where to write the run (default: runs/NAME-TIME)"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR",
        help="continue RUN_DIR (or --run-dir) from its newest valid checkpoint; --set may raise "
        "budgets such as train.max_steps. `--resume auto --run-dir DIR`: resume DIR if it has "
        "a checkpoint, else start it fresh (what a torchrun restart does by itself)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train on N processes of this machine (torchrun; DDP or FSDP2 by "
        "train.distributed); for several machines run torchrun yourself",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="N",
        help="with --nproc: when a rank fails, restart every rank up to N times; each restart "
        "resumes from the newest checkpoint",
    )
    p.set_defaults(func=cmd_train)
    add_cooldown_parser(sub)

    p = sub.add_parser(
        "list",
        help="list optimizers, schedules, workloads, recipes, parametrizations or config keys",
    )
    p.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["optimizers", "schedules", "workloads", "recipes", "parametrizations", "keys"]
        + ["all"],
        help="keys: every config key with its default and meaning (not part of all)",
    )
    p.set_defaults(func=cmd_list)

    add_tune_parsers(sub)
    add_compare_parsers(sub)
    add_deploy_parsers(sub)
    add_explain_parser(sub)
    add_prepare_parsers(sub)
    add_inspect_parser(sub)
    return parser


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    from rich.markup import escape

    from cadence.config import recipe_description, recipe_names
    from cadence.models.gpt import PARAMETRIZATIONS
    from cadence.optim import OPTIMIZERS
    from cadence.schedules import SCHEDULES
    from cadence.schedules.batch import BATCH_SCHEDULES
    from cadence.schedules.hparams import HPARAM_SCHEDULES
    from cadence.workloads import WORKLOADS

    if args.what == "keys":
        from cadence.config.keys import config_keys

        rows = config_keys()
        table = Table(title="config keys", title_justify="left")
        # the key whole on one line, however narrow the terminal (or a pipe's 80 columns): it
        # is what a user copies into --set or greps for; the meaning wraps instead
        table.add_column("key", no_wrap=True, min_width=max(len(k) for k, _, _ in rows))
        table.add_column("default")
        table.add_column("meaning")
        for key, default, meaning in rows:
            table.add_row(f"[bold]{escape(key)}", escape(default), escape(meaning))
        console.print(table)
        return 0
    sections = {
        "optimizers": [(n, s.description) for n, s in OPTIMIZERS.items()],
        "schedules": [*SCHEDULES.items(), *HPARAM_SCHEDULES.items(), *BATCH_SCHEDULES.items()],
        "workloads": [(n, s.description) for n, s in WORKLOADS.items()]
        + [("module:function", "your own: a function of the config returning a DatasetWorkload")],
        "recipes": [(n, recipe_description(n)) for n in recipe_names()],
        "parametrizations": list(PARAMETRIZATIONS.items()),
    }
    for name, items in sections.items():
        if args.what not in (name, "all"):
            continue
        table = Table(title=name, show_header=False, title_justify="left")
        for key, desc in items:
            table.add_row(f"[bold]{escape(key)}", escape(desc))  # descriptions hold [[...]]
        console.print(table)
    return 0


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """A config adjusted rather than refused (ConfigWarning) is one line on stderr."""
    from cadence.config import ConfigWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", ConfigWarning)
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            if issubclass(category, ConfigWarning):
                print(f"cadence: warning: {message}", file=sys.stderr)
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show  # restored by catch_warnings
        yield


def rank_main(argv: list[str]) -> None:
    """One rank of `cadence train --nproc N` (cli/launch.py): the CLI, its status as exit code.

    An unexpected error prints its traceback here, as a rank started by torchrun would: torch's
    launcher records a function's exception in an error file instead of showing it."""
    try:
        code = main(argv)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        sys.exit(1)
    if code:
        sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # `--nproc` re-runs the same command line on each rank
    args.rank_entry = rank_main
    if args.command is None:
        parser.print_help()
        return 0
    console = Console()
    try:
        with _one_line_warnings():
            return args.func(args, console)
    except _user_errors() as exc:
        print(f"cadence: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cadence: interrupted", file=sys.stderr)
        return 130
    except _distributed_errors() as exc:
        return _lost_group(exc)
    except RuntimeError as exc:
        if not _transport_error(exc):
            raise
        return _lost_group(exc)
    except OSError as exc:
        # A runtime fault of the machine (disk full, permissions): one line, exit 1. Saves are
        # atomic, so earlier checkpoints and files are intact.
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"cadence: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
