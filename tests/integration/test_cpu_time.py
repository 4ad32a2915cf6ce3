"""A run's CPU time, the cost compare ranks by, holds when a busy neighbour shares its core.

The run and a spinning neighbour process are pinned to the same core, so the neighbour takes
about half of it: the run's wall time must grow (else nothing was contended and the test shows
nothing), while its CPU time stays within a small factor of the same run alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cadence
from cadence.config import parse_config

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity"
)

RUN = [
    "workload=digits",
    "model.hidden=[256,256]",
    "batch.size=128",
    "train.max_steps=120",
    "train.eval_every=1000",
    "train.log_every=50",
    "train.threads=1",
    "train.progress=false",
]


def _train(run_dir: Path) -> dict:
    return cadence.train(parse_config(None, RUN), run_dir=run_dir, plots=False)


def test_cpu_time_holds_when_a_busy_neighbour_shares_the_core(tmp_path: Path) -> None:
    before = os.sched_getaffinity(0)
    core = min(before)
    os.sched_setaffinity(0, {core})
    try:
        _train(tmp_path / "warm")  # first-run costs (lazy init, allocator) out of the way
        alone = _train(tmp_path / "alone")
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            os.sched_setaffinity(hog.pid, {core})
            time.sleep(0.2)
            busy = _train(tmp_path / "busy")
        finally:
            hog.kill()
            hog.wait()
    finally:
        os.sched_setaffinity(0, before)
    wall = busy["train_time_s"] / alone["train_time_s"]
    cpu = busy["train_cpu_s"] / alone["train_cpu_s"]
    assert cpu < 1.3, f"CPU time moved x{cpu:.2f} with a neighbour (wall x{wall:.2f})"
    if wall < 1.5:  # something else loaded the core during the lone run too
        pytest.skip(f"the neighbour slowed the run only x{wall:.2f}: no contrast to check")
    assert busy["cpu_time_s"] >= busy["train_cpu_s"] > 0  # evaluation is outside training
