"""Which runs a comparison trains: a spec expanded into run plans, and a spec cut to some of
its workloads (``--workloads``). Kept apart from `cadence.bench.spec`, which reads and checks
specs, so either can grow without the other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cadence.bench.spec import (
    RunPlan,
    Spec,
    StrategySpec,
    applicable,
    build_config,
    grid,
    study_points,
    trial_label,
)
from cadence.config import ConfigError

__all__ = ["only_workloads", "plan_runs"]


def only_workloads(spec: Spec, names: list[str]) -> Spec:
    """The spec restricted to some of its workload entries (``--workloads``)."""
    unknown = [n for n in names if n not in spec.workloads]
    if unknown or not names:
        raise ConfigError(
            f"--workloads: {unknown[0] if unknown else '(empty)'} is not a workload of spec "
            f"{spec.name}; choose from: {', '.join(spec.workloads)}"
        )
    spec.workloads = {n: spec.workloads[n] for n in spec.workloads if n in names}
    src = dict(spec.source)
    src["workloads"] = {n: v for n, v in (src.get("workloads") or {}).items() if n in names}
    src["strategies"] = {}
    for s in list(spec.strategies.values()):
        if s.workloads is not None:
            s.workloads = [w for w in s.workloads if w in names]
            if not s.workloads:
                del spec.strategies[s.name]
                continue
        entry = dict(spec.source["strategies"][s.name] or {})
        if s.workloads is not None:
            entry["workloads"] = s.workloads
        entry["per_workload"] = {k: v for k, v in s.per_workload.items() if k in names}
        src["strategies"][s.name] = entry
    spec.source = src
    return spec


def plan_runs(
    spec: Spec, out: Path, phase: str, chosen: dict[tuple[str, str], dict[str, Any]] | None = None
) -> list[RunPlan]:
    """Runs of one phase.

    ``studies`` (the external and self rulesets): every trial of every study, in one phase.
    ``tune``: every tuning point of tuned strategies on the first seed, plus every seed of
    untuned strategies. ``seeds``: the remaining seeds of tuned strategies at the chosen point
    (``chosen[(strategy, workload)]``). Run directories are ``out/runs/WORKLOAD/STRATEGY/TRIAL/
    seedN``, so a resumed comparison finds the runs it already has.
    """
    plans: list[RunPlan] = []

    def add(s: StrategySpec, w: str, seed: int, label: str, params: dict[str, Any]) -> None:
        plans.append(
            RunPlan(
                strategy=s.name,
                workload=w,
                seed=seed,
                trial=label,
                params=params,
                config=build_config(spec, s, spec.workloads[w], seed, params),
                run_dir=out / "runs" / w / s.name / label / f"seed{seed}",
            )
        )

    for s in spec.strategies.values():
        for w in applicable(spec, s):
            if phase == "studies":
                for seed in spec.seeds:
                    for j, params in enumerate(study_points(spec, s, seed, w)):
                        add(s, w, seed, f"trial{j}" if params else "default", params)
                continue
            if phase == "tune":
                points = grid(s)
                seeds = spec.seeds if not s.tune else spec.seeds[:1]
            else:
                if not s.tune:
                    continue
                points = [(chosen or {})[(s.name, w)]]
                seeds = spec.seeds[1:]
            for params in points:
                for seed in seeds:
                    add(s, w, seed, trial_label(params), params)
    return plans
