"""Run a comparison: every run of a spec in parallel worker processes, resumable, then aggregate.

Each run is an ordinary `cadence.train` run directory under ``OUT/runs/``. A run counts as done
when its ``summary.json`` exists, was not written by an interrupted run and belongs to the same
config; a resumed comparison skips those and starts the rest from scratch (a fresh run gives an
honest wall time, a resumed one would not). ``OUT/runs.log`` gets one line per run started, so
"nothing was repeated" can be checked.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import yaml

from cadence.bench.plan import plan_runs
from cadence.bench.profiles import (
    INF,
    bootstrap_ci,
    median,
    performance_profile,
    performance_ratios,
    profile_score,
)
from cadence.bench.records import miss_reason, run_record
from cadence.bench.rulesets import study_bests, trial_key
from cadence.bench.significance import mean_ci, paired_test
from cadence.bench.spec import (
    PROFILE_MEASURES,
    RunPlan,
    Spec,
    applicable,
    build_config,
    grid,
    trial_label,
)
from cadence.config import Config, config_from_dict
from cadence.run import train
from cadence.training.stopping import StopReason
from cadence.workloads import check_config

__all__ = ["aggregate", "compare", "execute", "miss_reason", "run_record"]

Log = Callable[[str], None]


# ---------------------------------------------------------------- one run (in a worker)


def _train_worker(config: dict[str, Any], run_dir: str, cwd: str) -> dict[str, Any]:
    """Entry point of a pool worker: one thread, no progress bar, an ordinary run dir.

    The per-run PNG plots are skipped in workers: drawing them costs ~2 s per run with
    matplotlib (more than a small run trains), and the report overlays every run's curves from
    metrics.jsonl anyway.
    """
    os.chdir(cwd)  # the fork server keeps the directory it started in; relative paths are ours
    cfg = config_from_dict(config)
    check_config(cfg)
    return train(cfg, run_dir=run_dir, plots=False)


# What the pool's fork server imports once, before it forks any worker (see WorkerPool).
_PRELOAD = ["torch", "torch._dynamo", "cadence.bench.compare"]


class WorkerPool:
    """A process pool on a fork server, started on first use and shared by both phases.

    The fork server is a fresh interpreter that imports torch and cadence once (torch's
    optimizers import its compiler stack on their first step, so that is preloaded too) and
    forks every worker from there: N workers pay the seconds of imports once, not N times, and
    none inherits this process's state (torch's thread pool, open files), as a plain fork of
    it would.
    """

    def __init__(self, jobs: int) -> None:
        self.jobs = max(1, jobs)
        self._pool: ProcessPoolExecutor | None = None

    def get(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(_PRELOAD)
            self._pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx)
        return self._pool

    def close(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None


def _is_done(plan: RunPlan) -> bool:
    summary_path = plan.run_dir / "summary.json"
    config_path = plan.run_dir / "config.yaml"
    if not summary_path.is_file() or not config_path.is_file():
        return False
    try:
        summary = json.loads(summary_path.read_text())
        saved = yaml.safe_load(config_path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    reason = StopReason.of_summary(summary)
    if reason is None or reason.interrupted:  # unfinished, or from before stops were typed
        return False
    return saved == plan.config.to_dict()


def _clear(run_dir: Path) -> None:
    """An unfinished (or stale) run is redone from scratch; train refuses a used directory."""
    if run_dir.exists():
        shutil.rmtree(run_dir)


def execute(
    plans: Sequence[RunPlan], out: Path, pool: WorkerPool, log: Log = print
) -> dict[str, int]:
    """Train every plan that is not done yet, up to ``jobs`` at a time.

    Workers come from a fork server (WorkerPool), never forked from this process: a fork of it
    would inherit torch's thread pool and any open state. A run that raises is recorded as a
    failure (its error goes to ``run_dir/error.txt``) and counts as a miss; the comparison goes
    on.
    """
    todo = [p for p in plans if not _is_done(p)]
    counts = {"total": len(plans), "skipped": len(plans) - len(todo), "ran": 0, "failed": 0}
    if not todo:
        return counts
    out.mkdir(parents=True, exist_ok=True)
    for p in todo:
        _clear(p.run_dir)
    jobs = pool.jobs
    pending: dict[Future, RunPlan] = {}
    queue = list(todo)
    try:
        while queue or pending:
            while queue and len(pending) < max(1, jobs):
                p = queue.pop(0)
                with open(out / "runs.log", "a", encoding="utf-8") as fh:
                    fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} start {_rel(p, out)}\n")
                fut = pool.get().submit(
                    _train_worker, p.config.to_dict(), str(p.run_dir.resolve()), os.getcwd()
                )
                pending[fut] = p
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                p = pending.pop(fut)
                try:
                    summary = fut.result()
                except Exception as exc:  # a run's crash must not lose the others
                    counts["failed"] += 1
                    p.run_dir.mkdir(parents=True, exist_ok=True)
                    (p.run_dir / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
                    log(f"FAILED {_rel(p, out)}: {type(exc).__name__}: {exc}")
                    continue
                counts["ran"] += 1
                reached = summary.get("target_step") is not None
                log(
                    f"[{counts['ran'] + counts['failed'] + counts['skipped']}/{counts['total']}]"
                    f" {_rel(p, out)}: {'target at step ' + str(summary['target_step']) if reached else 'missed'}"
                    f" ({summary['wall_time_s']:.1f}s)"
                )
                reason = StopReason.of_summary(summary)
                if reason is not None and reason.interrupted:
                    raise KeyboardInterrupt
    except BaseException:
        pool.close(cancel=True)
        raise
    return counts


def _rel(p: RunPlan, out: Path) -> str:
    return str(p.run_dir.relative_to(out)) if p.run_dir.is_relative_to(out) else str(p.run_dir)


# ---------------------------------------------------------------- reading results


def _spread(values: Sequence[float]) -> dict[str, float]:
    lo, hi = bootstrap_ci(values)
    return {"median": median(values), "lo": lo, "hi": hi}


def _choose(records: Sequence[dict[str, Any]], by: str, higher: bool) -> dict[str, Any]:
    """The tuning trial that reaches the target fastest; among misses, the best final metric."""

    def key(r: dict[str, Any]) -> tuple[float, float]:
        fm = r.get("best_metric")
        fm = INF if fm is None else (-fm if higher else fm)
        return (r[f"{by}_to_target"], fm)

    return min(records, key=key)


MEASURES = ("steps", "samples", "tokens", "time", "cpu")


def aggregate(spec: Spec, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per strategy x workload: time-to-target on each measure (median + bootstrap interval
    over seeds, i.e. studies), reach rate, final and best metric, the winning hyper-parameters;
    then profiles and scores per measure, and a paired test of the two best on each workload.

    ``records`` hold one result per (strategy, workload, seed): under the external ruleset, the
    fastest trial of each study (`rulesets.study_bests`)."""
    table: list[dict[str, Any]] = []
    medians: dict[str, dict[str, dict[str, float]]] = {m: {} for m in PROFILE_MEASURES}
    medians["tokens"] = {}
    for s in spec.strategies.values():
        for m in medians:
            medians[m][s.name] = {}
        for w, entry in spec.workloads.items():
            rs = [r for r in records if r["strategy"] == s.name and r["workload"] == w]
            if not rs:
                continue
            metric, higher = workload_metric(spec, w, rs)
            best = min(rs, key=lambda r: trial_key(r, spec.profile_by, higher))
            row: dict[str, Any] = {
                "strategy": s.name,
                "workload": w,
                "metric": metric,
                "higher_is_better": higher,
                "target": entry.target,
                "trial": best["trial"],
                "params": best["params"],  # the fastest study's winner
                "study_params": [r["params"] for r in rs],
                "trials_per_study": max(r.get("study_trials", 1) for r in rs),
                "seeds": [r["seed"] for r in rs],
                "reached": sum(bool(r["reached"]) for r in rs),
                "runs": len(rs),
                "errors": [r["error"] for r in rs if r.get("error")],
            }
            steps_ci = mean_ci([r["steps_to_target"] for r in rs])
            row["steps_mean_ci"] = list(steps_ci) if steps_ci else None
            for m in MEASURES:
                stats = _spread([r[f"{m}_to_target"] for r in rs])
                row[f"{m}_to_target"] = stats
                medians[m][s.name][w] = stats["median"]
            for m in ("final_metric", "best_metric"):
                vals = [r[m] for r in rs if r[m] is not None]
                row[m] = _spread(vals) if vals else None
            table.append(row)

    workloads = list(spec.workloads)
    taus = [1.0 + i * (spec.tau_max * 2 - 1.0) / 400 for i in range(401)]
    profiles: dict[str, Any] = {}
    for m in PROFILE_MEASURES:
        ratios = performance_ratios(medians[m], workloads)
        profiles[m] = {
            "ratios": ratios,
            "score": {s: profile_score(r, spec.tau_max) for s, r in ratios.items()},
            "taus": taus,
            "rho": {s: performance_profile(r, taus) for s, r in ratios.items()},
        }
    winners = {}
    tests = {}
    for w in workloads:
        ts = {s: medians[spec.profile_by][s].get(w, INF) for s in spec.strategies}
        ranked = sorted((t, s) for s, t in ts.items() if not math.isinf(t))
        winners[w] = {
            "best": ranked[0][1] if ranked else None,
            "value": ranked[0][0] if ranked else None,
            "runner_up": ranked[1][1] if len(ranked) > 1 else None,
            "factor": ranked[1][0] / ranked[0][0] if len(ranked) > 1 and ranked[0][0] > 0 else None,
        }
        if len(ranked) > 1:
            tests[w] = _paired(spec, records, w, ranked[0][1], ranked[1][1])
    return {"table": table, "profiles": profiles, "winners": winners, "significance": tests}


def _paired(
    spec: Spec, records: Sequence[dict[str, Any]], workload: str, a: str, b: str
) -> dict[str, Any]:
    """The two best strategies on a workload, paired by seed (study), on steps and on the
    profile's measure."""

    def by_seed(strategy: str) -> dict[int, dict[str, Any]]:
        return {
            r["seed"]: r for r in records if r["strategy"] == strategy and r["workload"] == workload
        }

    ra, rb = by_seed(a), by_seed(b)
    seeds = sorted(set(ra) & set(rb))
    out: dict[str, Any] = {"a": a, "b": b, "seeds": seeds}
    for m in dict.fromkeys(("steps", spec.profile_by)):
        out[m] = paired_test(
            [ra[k][f"{m}_to_target"] for k in seeds], [rb[k][f"{m}_to_target"] for k in seeds]
        )
    return out


# ---------------------------------------------------------------- the whole comparison


def _tuning(
    spec: Spec, phase1: Sequence[RunPlan]
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], dict[str, Any]], dict[str, Any]]:
    """Read phase 1 and pick each tuned strategy's point per workload (first seed only)."""
    records1 = [run_record(p) for p in phase1]
    tuning: dict[str, dict[str, Any]] = {}
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for s in spec.strategies.values():
        if not s.tune:
            continue
        tuning[s.name] = {}
        for w in dict.fromkeys(p.workload for p in phase1 if p.strategy == s.name):
            trials = [r for r in records1 if r["strategy"] == s.name and r["workload"] == w]
            higher = workload_metric(spec, w, trials)[1]
            best = _choose(trials, spec.profile_by, higher)
            chosen[(s.name, w)] = best["params"]
            tuning[s.name][w] = {"chosen": best["params"], "trials": trials}
    return records1, chosen, tuning


def workload_metric(
    spec: Spec, workload: str, records: Sequence[dict[str, Any]]
) -> tuple[str, bool]:
    """The metric of a spec's workload and its direction: from a finished run's summary (so a
    user's own `package.module:function` workload needs no registry entry), else from the
    built-in registry."""
    from cadence.workloads import WORKLOADS

    for r in records:
        if r.get("metric") is not None:
            return r["metric"], bool(r["higher_is_better"])
    name = spec.workloads[workload].workload
    if name in WORKLOADS:
        return WORKLOADS[name].metric, WORKLOADS[name].higher_is_better
    return "metric", False  # no run of it finished: there is nothing to rank


def _hardware() -> dict[str, Any]:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def compare(
    spec: Spec, out: str | Path, jobs: int = 1, log: Log = print, report: bool = True
) -> dict[str, Any]:
    """Run (or resume) a comparison and write ``results.json`` (+ the reports) under ``out``.

    Phase 1 runs every tuning point on the first seed (and all seeds of untuned strategies);
    phase 2 runs the remaining seeds of each tuned strategy at its chosen point. Both phases
    share one pool size and the same skip-if-done rule.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.source, sort_keys=False))
    started = time.perf_counter()
    pool = WorkerPool(jobs)
    tuning: dict[str, Any] = {}
    if spec.ruleset == "grid":
        phase1 = plan_runs(spec, out, "tune")
        try:
            counts = execute(phase1, out, pool, log)
            records1, chosen, tuning = _tuning(spec, phase1)
            phase2 = plan_runs(spec, out, "seeds", chosen)
            c2 = execute(phase2, out, pool, log)
        finally:
            pool.close()
        for k in counts:
            counts[k] += c2[k]
        records = [
            r
            for r in records1
            if not spec.strategies[r["strategy"]].tune
            or r["params"] == chosen[(r["strategy"], r["workload"])]
        ] + [run_record(p) for p in phase2]
        trials = records1 + [run_record(p) for p in phase2]
    else:
        phase1 = plan_runs(spec, out, "studies")
        try:
            counts = execute(phase1, out, pool, log)
        finally:
            pool.close()
        trials = [run_record(p) for p in phase1]
        higher = {w: workload_metric(spec, w, trials)[1] for w in spec.workloads}
        records = study_bests(trials, spec.profile_by, higher)
    results: dict[str, Any] = {
        "spec": spec.name,
        "description": spec.description,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hardware": _hardware(),
        "jobs": jobs,
        "seeds": spec.seeds,
        "ruleset": spec.ruleset,
        "trials_per_study": spec.trials,
        "profile_by": spec.profile_by,
        "tau_max": spec.tau_max,
        "counts": counts,
        "elapsed_s": time.perf_counter() - started,
        "workloads": {
            w: {
                "workload": e.workload,
                "target": e.target,
                "max_steps": e.max_steps,
                "max_time_s": e.max_time_s,
                "trials": e.trials if e.trials is not None else spec.trials,
            }
            for w, e in spec.workloads.items()
        },
        "strategies": {
            s.name: {
                "description": s.description,
                "trials": _trial_labels(spec, s),
                "search": [_param_text(p) for p in s.search] if spec.ruleset == "external" else [],
                "config": _strategy_summary(phase1, s.name, spec),
            }
            for s in spec.strategies.values()
        },
        "tuning": tuning,
        "runs": records,  # one per strategy x workload x seed: what the statistics are of
        "trials": trials,  # every run trained, tuning trials included
        **aggregate(spec, records),
    }
    _write_json(out / "results.json", results)
    if report:
        from cadence.bench.report import write_reports

        write_reports(results, out)
    return results


def _trial_labels(spec: Spec, strategy: Any) -> list[str]:
    if spec.ruleset == "grid":
        return [trial_label(p) for p in grid(strategy)]
    most = max((spec.trials_of(strategy, w) for w in applicable(spec, strategy)), default=1)
    return [f"trial{j}" for j in range(most)] if strategy.search else ["default"]


def _param_text(p: Any) -> str:
    """One searched key as text: `optimizer.lr in [0.001, 1] (log)`."""
    if p.kind == "categorical":
        return f"{p.key} in {list(p.choices)}"
    return f"{p.key} in [{p.low:g}, {p.high:g}]" + (" (log)" if p.log else "")


def _strategy_summary(plans: Sequence[RunPlan], strategy: str, spec: Spec) -> str:
    """One line naming the optimizer, schedule and batch a strategy resolves to (its own
    settings: the searched keys are listed next to it)."""
    p = next((p for p in plans if p.strategy == strategy), None)
    if p is None:
        return ""
    c: Config = p.config
    if p.params:
        s = spec.strategies[strategy]
        c = build_config(spec, s, spec.workloads[p.workload], p.seed, {})
    bits = [f"{c.optimizer.name} lr={c.optimizer.lr:g}"]
    if c.optimizer.momentum:
        bits.append(f"momentum={c.optimizer.momentum:g}")
    sched = c.schedule.name + (f"+warmup {c.schedule.warmup}" if c.schedule.warmup else "")
    bits.append(sched)
    if c.plateau.enabled:
        bits.append(f"plateau x{c.plateau.factor:g}")
    bits.append(f"batch {c.batch.size}")
    return f"on {p.workload}: " + ", ".join(bits)


def _finite(value: Any) -> Any:
    """JSON has no infinity: a miss is written as null (the `reached` fields say which)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from cadence.io import atomic_write_json

    atomic_write_json(path, _finite(data))
