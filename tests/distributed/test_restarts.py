"""Issue 36, part 1: a job that restarts by itself and resumes where its checkpoints are.

torchrun's fault tolerance restarts every worker after a failure (`--max-restarts`) and
expects the script to carry on by itself. `cadence train --nproc 2 --max-restarts 2` is that
agent; one rank is killed with SIGKILL mid-run, and the job must finish on its own with the
uninterrupted run's weights (bit for bit on CPU) and every step in metrics.jsonl once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from cli_helpers import ForkedCLI, as_sets, run_forked

from .conftest import DIGITS, launch_here, rows

RUN = [*DIGITS, "train.max_steps=16", "train.checkpoint_every=4", "train.eval_every=8"]


def wait_for_step(proc: ForkedCLI, metrics: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        done = [json.loads(line)["step"] for line in lines[:-1]]  # complete lines only
        if done and done[-1] >= step:
            return
        time.sleep(0.005)
    raise AssertionError(f"no step {step} (the run exited {proc.poll()})")


def children(pid: int) -> list[int]:
    """The processes `pid` started (the agent's ranks)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def test_a_killed_rank_restarts_and_the_job_resumes_to_the_uninterrupted_run(tmp_path):
    launch_here("train", *as_sets(RUN), "--run-dir", str(tmp_path / "straight"), "--nproc", "2")
    run = tmp_path / "run"
    args = ["train", *as_sets(RUN), "--run-dir", str(run), "--nproc", "2", "--max-restarts", "2"]
    proc = ForkedCLI(*args)
    wait_for_step(proc, run / "metrics.jsonl", 6)  # past the step-4 checkpoint
    deadline = time.monotonic() + 30
    while not (ranks := children(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(ranks[-1], signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "torchrun restart 1: resuming" in out + err
    steps = [r["step"] for r in rows(run)]
    assert steps == list(range(1, 17))  # every step once: rows past the checkpoint rewound
    straight = tmp_path / "straight" / "model.safetensors"
    assert (run / "model.safetensors").read_bytes() == straight.read_bytes()
    assert rows(run)[-1]["train_loss"] == rows(tmp_path / "straight")[-1]["train_loss"]


def test_resume_auto_starts_fresh_then_resumes(tmp_path):
    run = tmp_path / "run"
    sets = as_sets([*RUN, "train.max_steps=4"])
    first = run_forked("train", *sets, "--resume", "auto", "--run-dir", str(run))
    assert first.returncode == 0, first.stderr
    assert f"--resume auto: {run} holds no checkpoint; starting it fresh" in first.stdout
    # the same command with a larger budget continues it (a budget may change on resume)
    more = as_sets([*RUN, "train.max_steps=8"])
    again = run_forked("train", *more, "--resume", "auto", "--run-dir", str(run))
    assert again.returncode == 0, again.stderr
    assert f"--resume auto: resuming {run} from step_00000004" in again.stdout
    assert [r["step"] for r in rows(run)] == list(range(1, 9))
    assert json.loads((run / "summary.json").read_text())["steps"] == 8
    bare = run_forked("train", *sets, "--resume", "auto")
    assert bare.returncode == 2 and "--resume auto: name the run's directory" in bare.stderr
