"""Comparing strategies by time to target (the AlgoPerf method on one machine).

`load_spec` reads a comparison spec (or a shipped suite), `compare` runs it in parallel worker
processes (resumably) and writes results.json + report.md + report.html, and
`cadence.bench.profiles` holds the pure statistics (time to target, performance profiles, score).
"""

from cadence.bench.compare import aggregate, compare
from cadence.bench.profiles import (
    bootstrap_ci,
    performance_profile,
    performance_ratios,
    profile_score,
    time_to_target,
)
from cadence.bench.spec import Spec, load_spec, suite_names

__all__ = [
    "Spec",
    "aggregate",
    "bootstrap_ci",
    "compare",
    "load_spec",
    "performance_profile",
    "performance_ratios",
    "profile_score",
    "suite_names",
    "time_to_target",
]
