"""The `cadence` command: parse -> build -> run. No training logic lives here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table


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
        "budgets such as train.max_steps",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train on N processes of this machine (torchrun; DDP or FSDP2 by "
        "train.distributed); for several machines run torchrun yourself",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("list", help="list optimizers, schedules, workloads or recipes")
    p.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["optimizers", "schedules", "workloads", "recipes", "all"],
    )
    p.set_defaults(func=cmd_list)

    from cadence.bench.cli import add_parsers as add_bench_parsers
    from cadence.deploy.cli import add_parsers as add_deploy_parsers
    from cadence.tune.cli import add_parsers as add_tune_parsers

    add_tune_parsers(sub)
    add_bench_parsers(sub)
    add_deploy_parsers(sub)
    return parser


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    from cadence.config import ConfigError, load_config
    from cadence.training.run import resume, train

    if args.nproc is not None:
        return launch(args)

    if args.resume is not None:
        run_dir = args.run_dir if args.resume is True else args.resume
        if run_dir is None:
            raise ConfigError("--resume: name the run, e.g. --resume runs/NAME or --run-dir DIR")
        summary = resume(run_dir, config=args.config, overrides=args.overrides)
    else:
        summary = train(load_config(args.config, args.overrides), run_dir=args.run_dir)
    reason = summary["stop_reason"] or ""
    if os.environ.get("RANK", "0") != "0":
        return 1 if reason.startswith("nonfinite") else 0  # rank 0 reports for the group
    if reason.startswith("interrupted"):
        print(
            f"cadence: {reason} at step {summary['steps']}; checkpoint saved. Resume with: "
            f"cadence train --resume {summary['run_dir']}",
            file=sys.stderr,
        )
        return 143 if "SIGTERM" in reason else 130
    if reason.startswith("nonfinite"):
        print(
            f"cadence: error: training stopped: {reason} (loss or gradient not finite); the last "
            f"good state is checkpointed in {summary['run_dir']}/checkpoints. Try a lower "
            "optimizer.lr, train.clip_grad_norm, or train.on_nonfinite=skip|rollback",
            file=sys.stderr,
        )
        return 1
    table = Table(title=f"run finished: {summary['stop_reason']}", show_header=False)
    fm = summary.get("final_metrics") or {}
    rows = [
        ("run dir", summary["run_dir"]),
        ("steps", f"{summary['steps']:,}"),
        (
            "samples" if not summary["tokens"] else "tokens",
            f"{summary['tokens'] or summary['samples']:,}",
        ),
        ("final train loss", _num(summary["final_train_loss"])),
    ]
    rows += [(k, _num(v)) for k, v in fm.items()]
    rows.append(
        (
            f"best {summary['metric']}",
            f"{_num(summary['best_metric'])} (step {summary['best_step']})",
        )
    )
    if summary["target"] is not None:
        rows.append(("target step", str(summary["target_step"])))
    rate = summary["tokens_per_s"] or summary["samples_per_s"]
    unit = "tokens/s" if summary["tokens"] else "samples/s"
    rows.append(("wall time", f"{summary['wall_time_s']:.1f} s ({rate:,.0f} {unit})"))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    return 0


def launch(args: argparse.Namespace) -> int:
    """`--nproc N`: run this same command under torchrun on N local processes."""
    import subprocess

    from cadence.config import ConfigError, load_config

    if args.nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1, got {args.nproc}")
    if args.resume is None:
        load_config(args.config, args.overrides)  # a bad config fails here, once, not N times
    rest, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "-m",
        "cadence",
        *rest,
    ]
    return subprocess.call(cmd)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    from cadence.config import recipe_description, recipe_names
    from cadence.optim import OPTIMIZERS
    from cadence.schedules import SCHEDULES
    from cadence.workloads import WORKLOADS

    sections = {
        "optimizers": [(n, s.description) for n, s in OPTIMIZERS.items()],
        "schedules": list(SCHEDULES.items()),
        "workloads": [(n, s.description) for n, s in WORKLOADS.items()],
        "recipes": [(n, recipe_description(n)) for n in recipe_names()],
    }
    for name, items in sections.items():
        if args.what not in (name, "all"):
            continue
        table = Table(title=name, show_header=False, title_justify="left")
        for key, desc in items:
            table.add_row(f"[bold]{key}", desc)
        console.print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # `--nproc` re-runs the same command line under torchrun
    if args.command is None:
        parser.print_help()
        return 0
    console = Console()
    try:
        return args.func(args, console)
    except _user_errors() as exc:
        print(f"cadence: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cadence: interrupted", file=sys.stderr)
        return 130
    except _distributed_errors() as exc:
        # Another process of the group died or timed out: one line, not N tracebacks.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        rank = os.environ.get("RANK", "?")
        print(
            f"cadence: error: rank {rank} lost the process group ({first[:200]})", file=sys.stderr
        )
        return 1
    except OSError as exc:
        # A runtime fault of the machine (disk full, permissions): one line, exit 1. Saves are
        # atomic, so earlier checkpoints and files are intact.
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"cadence: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
