"""Comparison specs: workloads x strategies x seeds, read from YAML and expanded into runs.

A spec is data, not code, so a comparison can be re-run, shared and resumed. Every run it names
is a plain `cadence.train` config built from dotted ``KEY: VALUE`` overrides (the same keys as
``--set``), so a comparison measures exactly what `cadence train` would do.

How much each strategy is tuned is the spec's ``tuning.ruleset`` (see `cadence.bench.rulesets`):
``external`` draws ``tuning.trials`` points per study from each strategy's ``search`` space,
``self`` runs every strategy at its own settings, ``grid`` is the older per-strategy ``tune`` grid.

Layering, later wins: ``defaults`` -> the workload's ``set`` -> the strategy's ``base`` (a recipe
or YAML file) -> the strategy's ``set`` -> its ``per_workload`` entry -> the tuning point ->
the run control the comparison owns (workload, target, budgets, seed, one thread, no progress).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cadence.bench.layering import build_config
from cadence.bench.rulesets import RULESETS, sample_points
from cadence.bench.spec_schema import (
    PROFILE_MEASURES,
    ProfileSection,
    SpecFile,
    StrategySection,
    TuningSection,
    WorkloadSection,
)
from cadence.config import Config, ConfigError
from cadence.config.typed import build_typed
from cadence.tune.space import Param, parse_space

__all__ = [
    "PROFILE_MEASURES",
    "RunPlan",
    "Spec",
    "StrategySpec",
    "WorkloadEntry",
    "build_config",
    "load_spec",
    "suite_names",
    "with_ruleset",
]


@dataclass
class WorkloadEntry:
    """One workload of the comparison, with the target every strategy races to."""

    name: str  # the key in the spec (a label; several entries may share a workload)
    workload: str  # lm | mnist | digits | logreg
    target: float  # value of the workload's validation metric that counts as reached
    max_steps: int  # step budget (also the horizon of every LR schedule)
    max_time_s: float | None = None  # wall-time budget per run
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys for every strategy
    # trials per study on this workload under external (None: the spec's tuning.trials); the
    # same for every strategy, so a costly workload can be tuned less without favouring anyone
    trials: int | None = None


@dataclass
class StrategySpec:
    """An optimizer + schedule + batch recipe, possibly with a small grid to tune over."""

    name: str
    base: str | None = None  # a recipe name or YAML path to start from
    overrides: dict[str, Any] = field(default_factory=dict)
    per_workload: dict[str, dict[str, Any]] = field(default_factory=dict)
    workloads: list[str] | None = None  # restrict to these workload entries (None = all)
    # key -> values (or {scale: [factors]} of the value the key would have), a grid
    tune: dict[str, list[Any]] = field(default_factory=dict)
    description: str = ""
    # key -> range, as in `cadence tune` (e.g. optimizer.lr: {low: 1e-3, high: 1, log: true}):
    # the space the external ruleset draws this strategy's trials from
    search: list[Param] = field(default_factory=list)


@dataclass
class Spec:
    name: str
    workloads: dict[str, WorkloadEntry]
    strategies: dict[str, StrategySpec]
    seeds: list[int]
    defaults: dict[str, Any] = field(default_factory=dict)
    profile_by: str = "cpu"  # cpu | time | steps | samples: the measure of the profile
    tau_max: float = 4.0  # upper end of the profile integral (AlgoPerf: 4)
    description: str = ""
    source: dict[str, Any] = field(default_factory=dict)  # the YAML as read, for results.json
    ruleset: str = "grid"  # external | self | grid (see cadence.bench.rulesets)
    trials: int = 1  # points per study per strategy under the external ruleset

    def trials_of(self, strategy: StrategySpec, workload: str | None = None) -> int:
        """Trials per study a strategy gets on a workload entry: the budget if it has a space
        to search, else 1."""
        if self.ruleset != "external" or not strategy.search:
            return 1
        entry = self.workloads.get(workload) if workload is not None else None
        return entry.trials if entry is not None and entry.trials is not None else self.trials


@dataclass(frozen=True)
class RunPlan:
    """One training run: where it lives and the config it trains."""

    strategy: str
    workload: str  # the workload entry's name
    seed: int
    trial: str  # "default", or a short label of the tuning point
    params: dict[str, Any]  # the tuning point (empty when not tuned)
    config: Config
    run_dir: Path


def suite_names() -> list[str]:
    root = importlib.resources.files("cadence") / "bench" / "suites"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read(spec_or_suite: str | Path, suite: bool) -> tuple[dict[str, Any], str]:
    if suite:
        name = str(spec_or_suite)
        if name not in suite_names():
            raise ConfigError(f"--suite {name}: unknown suite; choose one of: {suite_names()}")
        text = (
            importlib.resources.files("cadence") / "bench" / "suites" / f"{name}.yaml"
        ).read_text()
    else:
        path = Path(spec_or_suite)
        if not path.is_file():
            raise ConfigError(f"{path}: spec file not found; give a YAML spec or --suite NAME")
        text, name = path.read_text(), path.stem
    try:
        from cadence.config import yaml_load  # the same YAML 1.2 float rules as configs

        data = yaml_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{spec_or_suite}: invalid YAML; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{spec_or_suite}: a spec must be a YAML mapping")
    return data, name


def load_spec(spec_or_suite: str | Path, suite: bool = False) -> Spec:
    """Read and check a spec (or a shipped suite); every run's config is validated here, so a
    bad spec fails before any run starts or any file is written.

    The file's shape (types, defaults, allowed keys) is `cadence.bench.spec_schema`, read by the
    config's own typed loader; what is checked here is what ties one value to another."""
    data, name = _read(spec_or_suite, suite)
    raw: SpecFile = build_typed(SpecFile, data)
    tuning, profile = raw.tuning or TuningSection(), raw.profile or ProfileSection()
    seeds = _seeds(raw.seeds, tuning.studies)
    _at_least_one(raw.workloads, "workloads", "workload")
    workloads = {key: _workload(key, entry) for key, entry in raw.workloads.items()}
    _at_least_one(raw.strategies, "strategies", "strategy")
    strategies = {
        key: _strategy(key, entry or StrategySection(), workloads)
        for key, entry in raw.strategies.items()
    }
    spec = Spec(
        name=name if raw.name is None else raw.name,
        workloads=workloads,
        strategies=strategies,
        seeds=seeds,
        defaults=dict(raw.defaults or {}),
        profile_by=profile.by,
        tau_max=_above(profile.tau_max, 1, "profile.tau_max"),
        description=raw.description,
        source=data,
        trials=_positive_int(tuning.trials, "tuning.trials"),
    )
    default = "external" if any(s.search for s in strategies.values()) else "grid"
    ruleset = default if tuning.ruleset is None else tuning.ruleset
    return with_ruleset(spec, ruleset, where="tuning.ruleset")


def _seeds(seeds: int | list[int] | None, studies: int | None) -> list[int]:
    """The seeds, from ``seeds`` or from ``tuning.studies`` (a study is a seed), never both."""
    if studies is not None:
        _positive_int(studies, "tuning.studies")
        if seeds is not None:
            raise ConfigError("tuning.studies: a study is a seed; give seeds or studies, not both")
        seeds = studies
    if seeds is None:
        seeds = [0]
    elif isinstance(seeds, int):
        seeds = list(range(seeds))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: expected a count or a list of distinct integers, got {seeds!r}")
    return seeds


def _at_least_one(entries: dict[str, Any], key: str, what: str) -> None:
    if not entries:
        raise ConfigError(f"{key}: expected a mapping of {what} entries (at least one)")


def _workload(key: str, entry: WorkloadSection) -> WorkloadEntry:
    """A workload entry; its workload defaults to its name, which must name a workload."""
    from cadence.workloads import WORKLOADS, is_import_path

    where = f"workloads.{key}"
    workload = key if entry.workload is None else entry.workload
    if workload not in WORKLOADS and not is_import_path(workload):
        raise ConfigError(
            f"{where}.workload: unknown workload {workload!r}; choose one of: "
            f"{', '.join(WORKLOADS)}, or package.module:function for your own"
        )
    max_time = entry.max_time_s
    return WorkloadEntry(
        name=key,
        workload=workload,
        target=entry.target,
        max_steps=_positive_int(entry.max_steps, f"{where}.max_steps"),
        max_time_s=None if max_time is None else _above(max_time, 0, f"{where}.max_time_s"),
        overrides=dict(entry.set or {}),
        trials=None if entry.trials is None else _positive_int(entry.trials, f"{where}.trials"),
    )


def _strategy(
    key: str, entry: StrategySection, workloads: dict[str, WorkloadEntry]
) -> StrategySpec:
    """A strategy entry; the workloads it names must be the spec's, and it is tuned over a
    search space or a grid, not both."""
    where = f"strategies.{key}"
    if entry.workloads is not None and not all(w in workloads for w in entry.workloads):
        raise ConfigError(
            f"{where}.workloads: expected a list of workload entries from: "
            f"{', '.join(workloads)}, got {entry.workloads!r}"
        )
    per_workload = {w: dict(ov or {}) for w, ov in (entry.per_workload or {}).items()}
    for w in per_workload:
        if w not in workloads:
            raise ConfigError(f"{where}.per_workload.{w}: not a workload of this spec")
    tune = {k: _grid_values(v, f"{where}.tune.{k}") for k, v in (entry.tune or {}).items()}
    search: list[Param] = []
    if entry.search is not None:
        try:
            search = parse_space(entry.search)
        except ConfigError as exc:
            raise ConfigError(f"{where}.{exc}") from None
        if tune:
            raise ConfigError(f"{where}: give a search space or a tune grid, not both")
    return StrategySpec(
        name=key,
        base=entry.base,
        overrides=dict(entry.set or {}),
        per_workload=per_workload,
        workloads=entry.workloads,
        tune=tune,
        description=entry.description,
        search=search,
    )


def _grid_values(values: Any, where: str) -> list[Any]:
    """One key of a ``tune`` grid: a list of values, or ``{scale: [factors]}`` of the value the
    key would have (each factor becomes a point ``{scale: f}``)."""
    if isinstance(values, dict) and set(values) == {"scale"}:
        scales = values["scale"]
        if (
            not isinstance(scales, list)
            or not scales
            or not all(_number(x) and x > 0 for x in scales)
        ):
            raise ConfigError(f"{where}.scale: expected a list of factors > 0")
        return [{"scale": float(x)} for x in scales]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: expected a non-empty list of values or {{scale: [...]}}")
    return values


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _above(value: float, bound: float, where: str) -> float:
    if not value > bound:
        raise ConfigError(f"{where}: must be > {bound:g}, got {value!r}")
    return value


def _positive_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    return value


def with_ruleset(
    spec: Spec, ruleset: str, trials: int | None = None, where: str = "--ruleset"
) -> Spec:
    """The spec under another ruleset (``--ruleset`` overrides the spec's), with every run's
    config validated, so a bad spec fails before any run starts or any file is written.

    ``trials`` (``--trials``) is the new budget of every workload, the per-workload ones too:
    whoever asks for N trials on the command line means N everywhere."""
    if ruleset not in RULESETS:
        raise ConfigError(f"{where}: expected one of {', '.join(RULESETS)}, got {ruleset!r}")
    if ruleset == "external" and not any(s.search for s in spec.strategies.values()):
        raise ConfigError(
            f"{where}: external tuning needs a search space; give strategies.NAME.search, "
            "e.g. optimizer.lr: {low: 1.0e-3, high: 1.0, log: true}"
        )
    if ruleset == "grid" and any(s.search for s in spec.strategies.values()):
        raise ConfigError(f"{where}: grid runs tune grids; use external or self with search")
    spec.ruleset = ruleset
    if trials is not None:
        spec.trials = trials
        for entry in spec.workloads.values():
            entry.trials = None
        raw = spec.source.get("workloads") or {}
        spec.source = {
            **spec.source,
            "workloads": {
                k: {f: v for f, v in e.items() if f != "trials"} if isinstance(e, dict) else e
                for k, e in raw.items()
            },
        }
    source_tuning = dict(spec.source.get("tuning") or {})
    source_tuning.update(ruleset=ruleset, trials=spec.trials)
    spec.source = {**spec.source, "tuning": source_tuning}
    for s in spec.strategies.values():  # validate every config up front
        for w in applicable(spec, s):
            for params in points_to_check(spec, s):
                build_config(spec, s, spec.workloads[w], spec.seeds[0], params)
    return spec


def points_to_check(spec: Spec, strategy: StrategySpec) -> list[dict[str, Any]]:
    """Tuning points whose configs must all be valid: a grid, or a search space's corners."""
    if spec.ruleset == "grid":
        return grid(strategy)
    if spec.ruleset == "self" or not strategy.search:
        return [{}]
    return [{p.key: v} for p in strategy.search for v in _edges(p)]


def _edges(p: Param) -> list[Any]:
    from cadence.tune.space import thaw

    return [thaw(v) for v in p.samples()]


def study_points(
    spec: Spec, strategy: StrategySpec, seed: int, workload: str | None = None
) -> list[dict[str, Any]]:
    """The trials of one study (seed) for a strategy on a workload entry under the spec's
    ruleset. The points depend on the seed only, so every workload with the same trial count
    sees the same hyper-parameters."""
    if spec.ruleset == "external" and strategy.search:
        return sample_points(strategy.search, spec.trials_of(strategy, workload), seed)
    return [{}]


def applicable(spec: Spec, strategy: StrategySpec) -> list[str]:
    """The workload entries a strategy runs on (full-batch GD is not run on a 4 MB corpus)."""
    return [w for w in spec.workloads if strategy.workloads is None or w in strategy.workloads]


def grid(strategy: StrategySpec) -> list[dict[str, Any]]:
    """The tuning points of a strategy: the Cartesian product of its ``tune`` lists."""
    if not strategy.tune:
        return [{}]
    keys = list(strategy.tune)
    return [dict(zip(keys, vals)) for vals in itertools.product(*strategy.tune.values())]


def trial_label(params: dict[str, Any]) -> str:
    """A short, filesystem-safe, stable name for a tuning point."""
    if not params:
        return "default"

    def show(v: Any) -> str:
        return f"x{v['scale']:g}" if isinstance(v, dict) else str(v)

    text = ",".join(f"{k.split('.')[-1]}={show(params[k])}" for k in sorted(params))
    safe = "".join(c if c.isalnum() or c in "=.,-_" else "_" for c in text)
    if len(safe) <= 60:
        return safe
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return f"{safe[:48]}-{digest}"
