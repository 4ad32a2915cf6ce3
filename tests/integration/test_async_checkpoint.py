"""Issue 36, part 3: checkpoints written on a background thread.

The run must not change (weights, rows, checkpoints that resume alike), and a process killed
while a checkpoint is being written must leave only a temporary folder, so that resume takes the
previous checkpoint and ends as the uninterrupted run does, bit for bit.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from resume_helpers import TINY_LM, assert_same_run, crash_then_resume, rows, weights

import cadence
from cadence.training import checkpoint
from cli_helpers import Forked

pytestmark = pytest.mark.usefixtures("plots_off")

STEPS, EVERY = 12, 3
RUN = [*TINY_LM, f"train.max_steps={STEPS}", f"train.checkpoint_every={EVERY}"]
RUN += ["train.log_every=1", "train.eval_every=6", "optimizer.name=adamw", "model.dropout=0.1"]


def test_async_checkpoints_change_nothing_and_resume_exactly(make_config, tmp_path):
    sync = make_config("lm", *RUN)
    background = make_config("lm", *RUN, "train.async_checkpoint=true")
    cadence.train(sync, run_dir=tmp_path / "sync")
    cadence.train(background, run_dir=tmp_path / "async")
    assert weights(tmp_path / "async") == weights(tmp_path / "sync")
    assert rows(tmp_path / "async") == rows(tmp_path / "sync")
    for step in (6, 9, 12):  # the last three, each complete and verified
        a = checkpoint.load_checkpoint(tmp_path / "async" / "checkpoints" / f"step_{step:08d}")
        b = checkpoint.load_checkpoint(tmp_path / "sync" / "checkpoints" / f"step_{step:08d}")
        assert a["rng"]["torch"].equal(b["rng"]["torch"])
        for k, v in b["optimizer"]["state"].items():
            assert all(torch.equal(v[n], a["optimizer"]["state"][k][n]) for n in v)
    crash_then_resume(background, tmp_path / "crashed", 8)
    assert_same_run(tmp_path / "sync", tmp_path / "crashed", range(1, STEPS + 1))


def hang_while_writing(cfg: cadence.Config, run_dir: Path, step: int) -> int:
    """Train; the background write of step `step`'s checkpoint stops half-way, forever."""
    original = checkpoint._Job._write

    def stuck(job: checkpoint._Job) -> None:
        if job.step != step:
            return original(job)
        checkpoint._save_state({"partial": True}, job.tmp / "trainer.pt")
        (run_dir / "writing").touch()
        while True:
            time.sleep(1)

    checkpoint._Job._write = stuck
    cadence.train(cfg, run_dir=run_dir)
    return 0


def test_a_kill_during_a_background_write_resumes_from_the_previous_checkpoint(
    make_config, tmp_path
):
    from cadence.run import resume

    cfg = make_config("lm", *RUN, "train.async_checkpoint=true")
    cadence.train(make_config("lm", *RUN), run_dir=tmp_path / "straight")
    run = tmp_path / "run"
    child = Forked(lambda: hang_while_writing(cfg, run, 6))
    deadline = time.monotonic() + 120
    while not (run / "writing").exists() and child.poll() is None:
        assert time.monotonic() < deadline, "the write of step 6 never started"
        time.sleep(0.01)
    time.sleep(0.2)  # training goes on past step 6 while the write hangs
    child.send_signal(signal.SIGKILL)
    child.communicate()
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step_00000003" in saved and "step_00000006" not in saved
    assert any(name.startswith(".step_00000006.tmp") for name in saved)
    resume(run)
    assert_same_run(tmp_path / "straight", run, range(1, STEPS + 1))
