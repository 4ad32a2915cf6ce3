"""Shared pieces of the resume and fault tests: tiny configs, the CLI as a child process, crashes.

Runs are compared on their final weights (bytes of model.safetensors) and on metrics.jsonl with
the wall-time-derived fields left out.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

import cadence
from cadence.runtime.events import Callback
from cli_helpers import ForkedCLI, run_forked

# Fields that depend on the clock, not on the computation.
WALL_FIELDS = frozenset({"time_s", "train_time_s", "train_cpu_s", "samples_per_s", "tokens_per_s"})

# A GPT small enough that a step takes milliseconds on one core.
TINY_LM = [
    "workload=lm",
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "model.seq_len=16",
    "data.max_bytes=100000",
    "batch.size=4",
    "schedule.warmup=2",
    "train.eval_samples=8",
    "train.threads=1",
    "train.progress=false",
]

# The digits MLP with a hidden matrix (so muon has something to route), plus the two stateful
# controllers the issue names: a plateau that reduces at every evaluation that does not improve
# by half (so it fires in a few steps for every optimizer) and a batch ramp 4 -> 8 at mid-run.
DIGITS_CONTROLLED = [
    "workload=digits",
    "model.hidden=[32,32]",
    "batch.size=4",
    "batch.schedule=[[0.5, 8]]",
    "plateau.enabled=true",
    "plateau.patience=0",
    "plateau.threshold=0.5",
    "train.eval_samples=64",
    "train.threads=1",
    "train.progress=false",
]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`cadence ARGS` to the end, in a child forked from this process (cli_helpers.ForkedCLI)."""
    return run_forked(*args, timeout=timeout)


def start_cli(*args: str) -> ForkedCLI:
    """`cadence ARGS` started in a child forked from this process, to be killed or waited for."""
    return ForkedCLI(*args)


def last_logged_step(metrics: Path) -> int:
    """The step of the last complete line of metrics.jsonl (0 when there is none yet)."""
    try:
        text = metrics.read_text()
    except FileNotFoundError:
        return 0
    lines = [line for line in text.split("\n")[:-1] if line.strip()]  # complete lines only
    return json.loads(lines[-1])["step"] if lines else 0


def wait_for_step(proc: ForkedCLI, metrics: Path, step: int, timeout: float = 180) -> int:
    """Poll until metrics.jsonl logs a step >= `step`; returns it. Fails if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = last_logged_step(metrics)
        if seen >= step:
            return seen
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"run ended (rc {proc.returncode}) before step {step}:\n{err}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout}s")


def rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the wall-time-derived fields."""
    text = (run_dir / "metrics.jsonl").read_text()
    return [
        {k: v for k, v in json.loads(line).items() if k not in WALL_FIELDS}
        for line in text.splitlines()
        if line.strip()
    ]


def steps_of(run_dir: Path) -> list[int]:
    return [r["step"] for r in rows(run_dir)]


def weights(run_dir: Path) -> bytes:
    return (run_dir / "model.safetensors").read_bytes()


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.removeprefix("step_")) for p in root.glob("step_*") if p.is_dir())


class Crash(Exception):
    """Stands for a process dying: nothing after it runs."""


class CrashAt(Callback):
    """Raise `Crash` once the row of `step` has been logged (metrics.jsonl already holds it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_log(self, trainer: Any, row: dict[str, Any]) -> None:
        if row["step"] >= self.step:
            raise Crash(row["step"])


def crash_then_resume(cfg: cadence.Config, run_dir: Path, crash_step: int) -> None:
    """Train until the row of `crash_step` is written, die there, then `cadence.resume`."""
    from cadence.run import resume

    with pytest.raises(Crash):
        cadence.train(cfg, run_dir=run_dir, callbacks=[CrashAt(crash_step)])
    # The dying process had logged past its newest checkpoint; resume must drop those rows.
    assert steps_of(run_dir)[-1] == crash_step
    resume(run_dir)


def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """PNG plots dominate a tiny in-process run's time and are not what these tests check."""
    monkeypatch.setattr("cadence.run.rundir.plot_run", lambda *a, **k: None)


def tail_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_same_run(reference: Path, resumed: Path, expected_steps: Sequence[int]) -> None:
    """Bitwise-equal final weights and the same metrics rows, each step exactly once."""
    assert steps_of(resumed) == list(expected_steps)
    assert rows(resumed) == rows(reference)
    assert weights(resumed) == weights(reference)


def train_tiny_lm(run_dir: Path, *extra: str) -> Path:
    """A real training run of a tiny GPT (seq_len 32), for tests that export or serve it; no
    PNGs, which none of them reads (its callers are session and module fixtures, set up before
    a test's `plots_off`)."""
    torch.set_num_threads(1)
    overrides = [
        "schedule.warmup=0",
        "model.n_layer=1",
        "model.d_model=32",
        "model.n_head=2",
        "model.seq_len=32",
        "data.max_bytes=100000",
        "train.max_steps=5",
        "train.eval_every=5",
        "train.eval_samples=16",
        "train.progress=false",
        "train.threads=1",
        *extra,
    ]
    cadence.train(cadence.load_config(None, overrides), run_dir=run_dir, plots=False)
    return run_dir


def train_reference(overrides: Sequence[str], run_dir: Path) -> Path:
    """The uninterrupted run of a CLI run's overrides, trained in this process: what
    `cadence train --set ...` computes (the CLI calls the same load_config and train), without
    a fresh interpreter's imports; no PNGs, which the comparison does not read."""
    cadence.train(cadence.load_config(None, list(overrides)), run_dir=run_dir, plots=False)
    return run_dir


def kill_twice_then_resume(cmd: list[str], run_dir: Path, seed: int) -> None:
    """Start `cadence CMD`, SIGKILL it at a random logged step, resume and kill it again, then
    resume to the end: the interrupted run, to compare with an uninterrupted one."""
    import random
    import signal

    rng = random.Random(seed)
    reached = 0
    for _ in range(2):
        proc = start_cli(*cmd)
        reached = wait_for_step(proc, run_dir / "metrics.jsonl", reached + rng.randint(4, 8))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        cmd = ["train", "--resume", str(run_dir)]
    res = run_cli(*cmd)
    assert res.returncode == 0, res.stderr
