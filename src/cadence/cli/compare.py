"""`cadence compare`: argparse wiring and the handler.

The main CLI calls :func:`add_parsers` with its subparsers; the handler takes ``(args, console)``
and returns an exit status. A bad spec raises ``ConfigError`` before any run starts (the main CLI
prints one line and exits 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cadence.config import ConfigError

__all__ = ["add_parsers", "cmd_compare"]


def add_parsers(sub: Any) -> None:
    """Register `compare` on the main CLI's subparsers."""
    p = sub.add_parser(
        "compare",
        help="time-to-target benchmark: strategies x workloads x seeds -> report",
        description="Train every strategy of SPEC on every workload and seed until the target or "
        "the budget, then write results.json, report.md and report.html to --out. Re-running "
        "the same command resumes: finished runs are not repeated.",
    )
    p.add_argument("spec", nargs="?", default=None, help="a comparison spec (YAML)")
    p.add_argument(
        "--suite", default=None, help="a shipped suite instead of SPEC: seed | modern | finetune"
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/compare-NAME)")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs trained in parallel, one thread each (default 1)"
    )
    p.add_argument(
        "--ruleset",
        choices=("external", "self"),
        default=None,
        help="override the spec's tuning: external = each strategy's search space sampled "
        "--trials times per study, the study's fastest trial counts; self = no tuning",
    )
    p.add_argument(
        "--trials", type=int, default=None, help="trials per study under external (spec's)"
    )
    p.add_argument(
        "--workloads",
        default=None,
        help="comma-separated workload entries of the spec to run (default: all)",
    )
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    from cadence.bench.compare import compare
    from cadence.bench.plan import only_workloads
    from cadence.bench.report import _fmt
    from cadence.bench.spec import load_spec, with_ruleset

    if (args.spec is None) == (args.suite is None):
        raise ConfigError("compare: give a SPEC file or --suite NAME (one of them)")
    if args.jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1, got {args.jobs}")
    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials: must be >= 1, got {args.trials}")
    spec = load_spec(args.suite, suite=True) if args.suite else load_spec(args.spec)
    if args.workloads:
        spec = only_workloads(spec, [w.strip() for w in args.workloads.split(",") if w.strip()])
    if args.ruleset or args.trials:
        spec = with_ruleset(spec, args.ruleset or spec.ruleset, args.trials)
    out = Path(args.out) if args.out else Path("runs") / f"compare-{spec.name}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write there ({exc.strerror})") from None
    console.print(
        f"compare {spec.name} (ruleset {spec.ruleset}"
        + (f", {spec.trials} trials per study" if spec.ruleset == "external" else "")
        + f", {len(spec.seeds)} studies): output in {out} (re-run the command to resume)"
    )
    results = compare(spec, out, jobs=args.jobs, log=lambda line: console.print(line))

    by = results["profile_by"]
    table = Table(title=f"performance profile scores ({by} to target)")
    table.add_column("strategy")
    table.add_column("score", justify="right")
    for w in results["workloads"]:
        table.add_column(f"{w} ratio", justify="right")
    prof = results["profiles"][by]
    for s in sorted(prof["score"], key=lambda s: -prof["score"][s]):
        ratios = [_fmt(prof["ratios"][s].get(w)) for w in results["workloads"]]
        table.add_row(s, f"{prof['score'][s]:.3f}", *ratios)
    console.print(table)
    console.print(
        f"report: {out / 'report.html'}  ·  {out / 'report.md'}  ·  {out / 'results.json'}"
    )
    return 1 if results["counts"]["failed"] else 0
