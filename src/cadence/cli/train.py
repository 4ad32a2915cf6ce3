"""`cadence train`: run (or resume) a training run, here or on N processes via torchrun;
`cadence cooldown`: branch a cooldown off a stable-phase checkpoint into a new run."""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console
from rich.table import Table

from cadence.config import ConfigError
from cadence.training.stopping import StopKind, StopReason


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    from cadence.run import auto_resume, load_config, restart_count, resume, train

    if args.nproc is not None:
        return launch(args)

    if args.resume == "auto" or (args.resume is None and restart_count() > 0):
        if args.run_dir is None:
            raise ConfigError(
                "--resume auto: name the run's directory with --run-dir DIR (it resumes from its "
                "newest checkpoint, or starts there fresh)"
            )
        summary = auto_resume(args.run_dir, config=args.config, overrides=args.overrides)
    elif args.resume is not None:
        summary = resume(_resume_dir(args), config=args.config, overrides=args.overrides)
    else:
        summary = train(load_config(args.config, args.overrides), run_dir=args.run_dir)
    return report(summary, console)


def _resume_dir(args: argparse.Namespace) -> str:
    """The run `--resume` names: its argument, or `--run-dir` for a bare `--resume`."""
    run_dir = args.run_dir if args.resume is True else args.resume
    if run_dir is None:
        raise ConfigError("--resume: name the run, e.g. --resume runs/NAME or --run-dir DIR")
    return run_dir


def add_cooldown_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cooldown",
        help="branch a cooldown off a wsd/constant run's stable-phase checkpoint",
        description="Cool down RUN_DIR from one of its stable-phase checkpoints over --steps "
        "steps into a new run directory (warmup-stable-decay: one stable run serves many "
        "budgets). The source run is left untouched.",
    )
    p.add_argument("source", metavar="RUN_DIR", help="a wsd or constant-LR run")
    p.add_argument("--steps", type=int, required=True, help="length of the cooldown in steps")
    p.add_argument(
        "--at", type=int, default=None, metavar="STEP",
        help="the checkpoint to branch from (default: the newest)",
    )  # fmt: skip
    p.add_argument(
        "--shape", default=None, choices=["linear", "1-sqrt", "cosine"],
        help="cooldown shape (default: the run's schedule.cooldown)",
    )  # fmt: skip
    p.add_argument(
        "--min-lr-ratio", type=float, default=None, metavar="R",
        help="LR at the end as a fraction of the peak (default: the run's schedule.min_lr_ratio)",
    )  # fmt: skip
    p.add_argument(
        "--run-dir", default=None,
        help="where to write the branch (default: RUN_DIR-cooldown-STEP+STEPS next to it)",
    )  # fmt: skip
    p.set_defaults(func=cmd_cooldown)


def cmd_cooldown(args: argparse.Namespace, console: Console) -> int:
    from cadence.run.branch import cooldown

    summary = cooldown(
        args.source,
        args.steps,
        at=args.at,
        shape=args.shape,
        min_lr_ratio=args.min_lr_ratio,
        run_dir=args.run_dir,
    )
    return report(summary, console)


def report(summary: dict, console: Console) -> int:
    """The exit status of a finished run, with its summary table or its one-line reason."""
    reason = StopReason.of_summary(summary)
    if os.environ.get("RANK", "0") != "0":
        return 1 if reason is not None and reason.failed else 0  # rank 0 reports for the group
    if reason is not None and reason.interrupted:
        print(
            f"cadence: {reason} at step {summary['steps']}; checkpoint saved. Resume with: "
            f"cadence train --resume {summary['run_dir']}",
            file=sys.stderr,
        )
        return 143 if reason.detail == "SIGTERM" else 130
    if reason is not None and reason.kind is StopKind.SPIKE:
        print(
            f"cadence: error: training stopped: {reason}; the last good state is checkpointed "
            f"in {summary['run_dir']}/checkpoints. Try a lower optimizer.lr or "
            "train.clip_grad_norm; `cadence inspect` shows which layer moved first",
            file=sys.stderr,
        )
        return 1
    if reason is not None and reason.failed:
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
    """`--nproc N`: this same command line on N local ranks (torchrun's agent, see cli/launch.py)."""
    from cadence.cli.launch import launch as launch_ranks
    from cadence.run import load_config, resume_config

    # a bad config (or a resume of nothing) fails here, once, not on every rank
    if args.resume in (None, "auto"):
        load_config(args.config, args.overrides)
    else:
        resume_config(_resume_dir(args), args.config, args.overrides)
    rest, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--max-restarts=")):
            continue
        rest.append(a)
    return launch_ranks(args.nproc, rest, args.rank_entry, max_restarts=args.max_restarts)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"
