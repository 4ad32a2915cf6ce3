"""`cadence find-lr`, `cadence find-batch`, `cadence tune`: argparse wiring and handlers.

The main CLI calls :func:`add_parsers` with its subparsers; each handler takes
``(args, console)`` and returns an exit status. User errors raise ``ConfigError`` (one line,
exit 2, printed by the main CLI); nothing is written before the config has been validated.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cadence.cli.args import add_config_args
from cadence.config import ConfigError
from cadence.config.privacy import refuse_unaccounted
from cadence.tune.storage import DEFAULT_HEARTBEAT_S, DEFAULT_MAX_RETRY

__all__ = ["add_parsers", "cmd_find_batch", "cmd_find_lr", "cmd_tune"]


def add_parsers(sub: Any) -> None:
    """Register find-lr, find-batch and tune on the main CLI's subparsers."""
    p = sub.add_parser("find-lr", help="LR range test: suggest optimizer.lr (+ plot)")
    add_config_args(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/find-lr-NAME-TIME)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="start of the ramp (default 1e-6)")
    p.add_argument("--max-lr", type=float, default=10.0, help="end of the ramp (default 10)")
    p.add_argument("--steps", type=int, default=100, help="steps of the ramp (default 100)")
    p.add_argument("--seeds", type=int, default=1, help="average over N data orders (default 1)")
    p.add_argument(
        "--smoothing", type=float, default=0.8, help="EMA factor of the loss (default 0.8)"
    )
    p.set_defaults(func=cmd_find_lr)

    p = sub.add_parser("find-batch", help="gradient noise scale: critical batch size and its LR")
    add_config_args(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/find-batch-NAME-TIME)")
    p.add_argument("--small", type=int, default=None, help="small batch (default batch.size/8)")
    p.add_argument("--big", type=int, default=None, help="big batch, a multiple of --small (16x)")
    p.add_argument("--measurements", type=int, default=20, help="how many pairs (default 20)")
    p.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="train this many steps first: the noise scale grows during training (default 0)",
    )
    p.set_defaults(func=cmd_find_batch)

    p = sub.add_parser("tune", help="hyperparameter search with Optuna, pruning bad trials")
    add_config_args(p)
    # One of the two is needed; checked by cmd_tune (not argparse's required=True) so that a
    # bare `cadence tune` quoted in the docs still parses, as `cadence train` does.
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--trials", type=int, metavar="N", help="run N more trials (added to the study)"
    )
    budget.add_argument(
        "--study-trials",
        type=int,
        metavar="N",
        help="run until the study holds N trials, together with every worker on the same "
        "--storage and --study; run again to resume, with a larger N to extend",
    )
    p.add_argument("--space", default=None, help="search-space YAML (else the config's search:)")
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="where the study lives: sqlite:///FILE, postgresql://USER@HOST/DB (shared by "
        "machines) or journal:PATH (a file on a shared filesystem); default RUN_DIR/study.db",
    )
    p.add_argument("--study", default=None, help="study name; an existing study is resumed")
    p.add_argument(
        "--heartbeat",
        type=int,
        default=DEFAULT_HEARTBEAT_S,
        metavar="SECONDS",
        help="a running trial beats this often; one silent for two beats is failed and "
        f"retried by another worker (default {DEFAULT_HEARTBEAT_S})",
    )
    p.add_argument(
        "--max-retry",
        type=int,
        default=DEFAULT_MAX_RETRY,
        metavar="N",
        help=f"retries of a trial whose worker died (default {DEFAULT_MAX_RETRY})",
    )
    p.add_argument(
        "--pruner",
        default="median",
        choices=["median", "halving", "hyperband", "none"],
        help="how bad trials are stopped early from their validation loss (default median)",
    )
    p.add_argument("--metric", default="val_loss", help="validation metric to optimise")
    p.add_argument(
        "--run-dir", "--out", dest="run_dir", default=None, help="default: runs/tune-NAME-TIME"
    )
    p.set_defaults(func=cmd_tune)


def _out_dir(given: str | None, kind: str, workload: str) -> Path:
    if given is not None:
        path = Path(given)
    else:
        path = Path("runs") / f"{kind}-{workload}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot create it ({exc.strerror})") from None
    return path


def _progress(console: Console, label: str, total: int) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(
        TextColumn(label),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    return prog


def cmd_find_lr(args: argparse.Namespace, console: Console) -> int:
    from cadence.run import load_config
    from cadence.tune.lr_finder import lr_range_test, write_lr_find
    from cadence.workloads import build_workload

    cfg = load_config(args.config, args.overrides)
    refuse_unaccounted(cfg, "find-lr")
    if args.seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1, got {args.seeds}")
    workload = build_workload(cfg)
    prog = _progress(console, "lr range test", args.steps * args.seeds)
    done = [0]
    with prog:
        task = prog.add_task("lr", total=args.steps * args.seeds, info="")

        def tick(step: int, total: int, lr: float, loss: float) -> None:
            done[0] += 1
            prog.update(task, completed=done[0], info=f"lr {lr:.2e} loss {loss:.4g}")

        try:
            result = lr_range_test(
                cfg,
                workload,
                min_lr=args.min_lr,
                max_lr=args.max_lr,
                steps=args.steps,
                beta=args.smoothing,
                seeds=[cfg.train.seed + i for i in range(args.seeds)],
                progress=tick,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    json_path, png = write_lr_find(result, _out_dir(args.out, "find-lr", cfg.workload))
    table = Table(title=f"LR range test: {cfg.workload} · {cfg.optimizer.name}", show_header=False)
    table.add_row("suggested optimizer.lr", f"[bold]{result.suggestion:.3g}")
    table.add_row("steepest descent at", f"{result.steepest_lr:.3g}")
    table.add_row("loss minimum at", f"{result.min_loss_lr:.3g}")
    div = "not within the range" if result.diverged_lr is None else f"{result.diverged_lr:.3g}"
    table.add_row("diverged at", div)
    if len(result.seeds) > 1:
        table.add_row("per seed", ", ".join(f"{s:.3g}" for s in result.per_seed_suggestions))
    table.add_row("steps (samples)", f"{result.steps:,} ({result.samples:,})")
    table.add_row("wrote", f"{json_path}, {png}")
    console.print(table)
    console.print(f"train with: --set optimizer.lr={result.suggestion:.3g}")
    return 0


def cmd_find_batch(args: argparse.Namespace, console: Console) -> int:
    from cadence.io import atomic_write_json
    from cadence.run import load_config
    from cadence.tune.noise_scale import estimate_noise_scale
    from cadence.workloads import build_workload

    cfg = load_config(args.config, args.overrides)
    refuse_unaccounted(cfg, "find-batch")
    if args.train_steps < 0:
        raise ConfigError(f"--train-steps: must be >= 0, got {args.train_steps}")
    workload = build_workload(cfg)
    prog = _progress(console, "noise scale", args.measurements)
    with prog:
        task = prog.add_task("ns", total=args.measurements, info="")

        def tick(m: int, total: int, b: float) -> None:
            prog.update(task, completed=m, info=f"B_simple {b:,.1f}")

        if args.train_steps:
            console.print(f"training {args.train_steps} steps first ...")
        try:
            est = estimate_noise_scale(
                cfg,
                workload,
                b_small=args.small,
                b_big=args.big,
                measurements=args.measurements,
                train_steps=args.train_steps,
                progress=tick,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    out = _out_dir(args.out, "find-batch", cfg.workload)
    atomic_write_json(out / "noise_scale.json", est.to_dict())
    table = Table(title=f"gradient noise scale: {cfg.workload}", show_header=False)
    ok = math.isfinite(est.b_simple) and est.b_simple > 0
    table.add_row("B_simple = tr(Σ)/|G|²", f"{est.b_simple:,.1f}" if ok else str(est.b_simple))
    table.add_row("critical batch size", f"[bold]{est.critical_batch:,}")
    table.add_row(
        "LR for it",
        f"[bold]{est.critical_lr:.3g}[/] (from optimizer.lr={est.lr:.3g} at batch {est.batch_size})",
    )
    table.add_row("|G|², tr(Σ)", f"{est.grad_sq:.4g}, {est.trace:.4g}")
    table.add_row("batches", f"{est.b_small} and {est.b_big}, {est.measurements} pairs")
    table.add_row("wrote", str(out / "noise_scale.json"))
    console.print(table)
    if not ok:
        console.print("the gradient is lost in the noise here: measure later (--train-steps)")
    return 0


def cmd_tune(args: argparse.Namespace, console: Console) -> int:
    from cadence.tune.space import load_space, parse_space, split_search_section
    from cadence.tune.storage import database_error, open_storage
    from cadence.tune.sweep import check_budget, run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        base, space = split_search_section(args.config, args.overrides, Path(tmp))
    if args.space is not None:
        space = load_space(args.space)
    if space is None:
        raise ConfigError(
            "tune: no search space; add a search: section to the config or give --space FILE"
        )
    params = parse_space(space, base)
    check_budget(args.trials, args.study_trials)
    # A named storage is opened (and so checked) before the run directory is made.
    store = None
    if args.storage is not None:
        store = open_storage(
            args.storage, Path("."), heartbeat_s=args.heartbeat, max_retry=args.max_retry
        )
    out = _out_dir(args.run_dir, "tune", base.workload)
    budget = (
        f"{args.trials} trials"
        if args.trials is not None
        else f"until the study holds {args.study_trials} trials"
    )
    console.print(
        f"tuning {', '.join(p.key for p in params)} on {base.workload}: {budget}, "
        f"pruner {args.pruner}, {base.train.max_steps} steps each at most"
    )

    def on_trial(row: dict[str, Any], i: int, n: int) -> None:
        vals = " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in row["params"].items())
        value = "-" if row["value"] is None else f"{row['value']:.5g}"
        state = row["state"].lower()
        retry = "" if row["retry_of"] is None else f", retries trial {row['retry_of']}"
        console.print(
            f"trial {i}/{n} \\[{state}] {vals} -> {args.metric} {value} ({row['steps']} steps{retry})"
        )

    try:
        result = run_sweep(
            base,
            params,
            trials=args.trials,
            study_trials=args.study_trials,
            out_dir=out,
            storage=store,
            study_name=args.study,
            pruner=args.pruner,
            metric=args.metric,
            heartbeat_s=args.heartbeat,
            max_retry=args.max_retry,
            on_trial=on_trial,
        )
    except Exception as exc:
        lost = database_error(exc)
        if lost is None:
            raise
        where = store.display if store is not None else str(out / "study.db")
        print(
            f"cadence: error: --storage {where}: the study's database failed mid-study ({lost}); "
            "finished trials are kept there: run the same command again to resume",
            file=sys.stderr,
        )
        return 1
    table = Table(title=f"best of {result.study_name}", show_header=False)
    for k, v in result.best_params.items():
        table.add_row(k, f"[bold]{_fmt(v)}")
    table.add_row(result.metric, f"{result.best_value:.6g}")
    table.add_row(
        "trials" if len(result.workers) < 2 else "trials (this worker)",
        f"{result.n_complete} complete, {result.n_pruned} pruned, {result.n_failed} failed",
    )
    if len(result.workers) > 1 or result.study_trials is not None:
        table.add_row("study", f"{result.n_study_trials} trials by {len(result.workers)} worker(s)")
    table.add_row("steps spent", f"{result.total_steps:,}")
    table.add_row("storage", result.storage)
    table.add_row("wrote", f"{out / 'best.yaml'}, {out / 'tune.json'}, {out / 'plots'}")
    console.print(table)
    console.print(f"train it: cadence train {out / 'best.yaml'}")
    return 0


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
