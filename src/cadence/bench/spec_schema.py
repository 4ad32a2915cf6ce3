"""The shape of a comparison spec file, as `cadence.config.typed.build_typed` reads it.

These classes describe the YAML as written (``set``, ``profile: {by, tau_max}``, ``seeds`` as a
count or a list); `cadence.bench.spec` turns them into the `Spec` the comparison runs. Types,
defaults and allowed keys live here; rules that tie one value to another (a strategy's
``per_workload`` names a workload of the spec) live in `cadence.bench.spec`. A ``| None``
section or mapping may be written empty (``set:`` with nothing after it) and means its default.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "PROFILE_MEASURES",
    "ProfileSection",
    "SpecFile",
    "StrategySection",
    "TuningSection",
    "WorkloadSection",
]

ProfileMeasure = Literal["cpu", "time", "steps", "samples"]
PROFILE_MEASURES: tuple[str, ...] = typing.get_args(ProfileMeasure)


@dataclass
class WorkloadSection:
    """``workloads.NAME``: one workload and the target every strategy races to."""

    target: float  # value of the workload's validation metric that counts as reached
    max_steps: int  # step budget (also the horizon of every LR schedule); > 0
    workload: str | None = None  # a registered workload or package.module:function (None: NAME)
    max_time_s: float | None = None  # wall-time budget per run; > 0
    trials: int | None = None  # trials per study here under external (None: tuning.trials)
    set: dict[str, Any] | None = None  # dotted config keys for every strategy on this workload


@dataclass
class StrategySection:
    """``strategies.NAME``: an optimizer + schedule + batch recipe, tuned or not."""

    base: str | None = None  # a recipe name or YAML path to start from
    set: dict[str, Any] | None = None  # dotted config keys
    per_workload: dict[str, dict[str, Any] | None] | None = None  # workload -> dotted keys
    workloads: list[str] | None = None  # run only on these workload entries (None: all)
    tune: dict[str, Any] | None = None  # key -> [values] or {scale: [factors]}: a grid
    search: Any = None  # key -> range, as in `cadence tune` (read by cadence.tune.space)
    description: str = ""


@dataclass
class ProfileSection:
    """``profile``: how the performance profile is measured."""

    by: ProfileMeasure = "cpu"  # the measure the profile compares
    tau_max: float = 4.0  # upper end of the profile integral (AlgoPerf: 4); > 1


@dataclass
class TuningSection:
    """``tuning``: how much each strategy is tuned (see `cadence.bench.rulesets`)."""

    ruleset: str | None = None  # external | self | grid (None: external if any search, else grid)
    trials: int = 1  # points per study per strategy under external; > 0
    studies: int | None = None  # a study is a seed: ``studies: K`` is ``seeds: K``


@dataclass
class SpecFile:
    """A whole spec file."""

    workloads: dict[str, WorkloadSection] = field(default_factory=dict)  # at least one
    strategies: dict[str, StrategySection | None] = field(default_factory=dict)  # at least one
    name: str | None = None  # None: the file's stem (or the suite's name)
    description: str = ""
    seeds: int | list[int] | None = None  # a count or distinct integers (None: [0])
    defaults: dict[str, Any] | None = None  # dotted config keys for every run
    profile: ProfileSection | None = None
    tuning: TuningSection | None = None
