"""Issue 36, part 3: asynchronous sharded (FSDP2) checkpoints through DCP's async_save.

Two processes under train.distributed=fsdp with train.async_checkpoint: each rank's shards are
staged to host memory and written by DCP on a thread, and rank 0 writes the manifest and renames
the folder only once every rank's shards are on disk. The run must not change: same rows, same
final weights, and checkpoints holding the same tensors as the synchronous run's, bit for bit
(same processes, same reductions). A resume from one of them continues the same run. A job
killed while a background write hangs (inside DCP's shard writes, or after them, before the
manifest) leaves only a temporary folder, so resume takes the previous checkpoint and ends as
the uninterrupted run does. A write that fails on one rank (a full disk) fails every rank at
the next save, in one line, and leaves no folder for that step.

The hangs and the failure are the tests' own monkeypatches in a forked child, inherited by the
ranks its launcher forks (CPU: ranks are forked, see cadence.cli.launch); nothing in cadence
knows of them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cadence.cli import main as cadence_main
from cadence.training import checkpoint
from cadence.training.sharded import consolidate
from cli_helpers import Forked, as_sets

from .conftest import LM, assert_same_rows, assert_same_weights, launch_here, rows, truncated_copy

CFG = [
    *LM,
    "train.ema=0.9",
    "train.distributed=fsdp",
    "train.max_steps=8",
    "train.eval_every=4",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=10",
]
ASYNC = [*CFG, "train.async_checkpoint=true"]
HANGS = 6  # the step whose background write the crash tests stop half-way
# the tests' patches reach the ranks because the launcher forks them, which it does without CUDA
FORKED_RANKS = pytest.mark.skipif(
    torch.cuda.is_available(), reason="ranks are spawned with CUDA: the patch would not reach them"
)


def train(cfg: list[str], run_dir: Path) -> None:
    launch_here("train", *as_sets(cfg), "--run-dir", str(run_dir), "--nproc", "2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("async_sharded")
    train(CFG, root / "sync")
    train(ASYNC, root / "async")
    return {"sync": root / "sync", "async": root / "async"}


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _without(d: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def test_async_sharded_checkpoints_equal_the_synchronous_ones(runs: dict[str, Path]) -> None:
    sync, background = runs["sync"], runs["async"]
    assert_same_rows(rows(background), rows(sync), rtol=0)
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert_same_weights(background / name, sync / name, rtol=0, atol=0)
    for step in (2, 4, 6, 8):
        a, b = _ckpt(background, step), _ckpt(sync, step)
        manifest = checkpoint.verify(a)  # every file, every rank's shards, checksummed
        assert (manifest["layout"], manifest["world_size"]) == ("sharded", 2)
        assert sorted(manifest["files"]) == sorted(checkpoint.verify(b)["files"])
        for prefix in ("model/", "optim/", "ema/"):
            _same_tensors(consolidate(a / "sharded", prefix), consolidate(b / "sharded", prefix))
        x, y = checkpoint.load_checkpoint(a), checkpoint.load_checkpoint(b)
        clocks = {k for k in y["train_state"] if k.endswith("_s")}  # times, not computation
        assert _without(x["train_state"], clocks) == _without(y["train_state"], clocks)
        assert x["rng"]["torch"].equal(y["rng"]["torch"])
        assert x["sharded"] == y["sharded"]  # optimizer groups, non-tensor state, EMA decay
    assert not [p for p in (background / "checkpoints").iterdir() if ".tmp" in p.name]


def test_resume_from_an_async_sharded_checkpoint_is_exact(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    resumed = truncated_copy(runs["async"], tmp_path / "run", step=4)
    launch_here("train", "--resume", str(resumed), "--nproc", "2")
    assert_same_rows(rows(resumed), rows(runs["sync"]), rtol=0)
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert_same_weights(resumed / name, runs["sync"] / name, rtol=0, atol=0)


def _hang(marker: Path) -> None:
    marker.touch()
    while True:
        time.sleep(1)


def _hang_in_dcp_writes(marker: Path) -> None:
    """Each rank's DCP thread writes its shards of step HANGS, then stops before the metadata."""
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    original = _FileSystemWriter.write_data

    def write_data(self: Any, plan: Any, planner: Any) -> Any:
        written = original(self, plan, planner)
        if f"step_{HANGS:08d}" in str(self.path):
            written.wait()
            _hang(marker)
        return written

    _FileSystemWriter.write_data = write_data


def _hang_before_the_manifest(marker: Path) -> None:
    """Every rank's shards and DCP's metadata of step HANGS are on disk; rank 0 stops before
    trainer.pt is whole and the manifest is written."""
    original = checkpoint._Job._write

    def stuck(job: checkpoint._Job) -> None:
        if job.step != HANGS:
            return original(job)
        checkpoint._save_state({"partial": True}, job.tmp / "trainer.pt")
        _hang(marker)

    checkpoint._Job._write = stuck


def process_tree(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(c) for c in path.read_text().split()] if path.exists() else []
    return [pid, *(k for kid in kids for k in process_tree(kid))]


def crash_while_writing(patch: Callable[[Path], None], run: Path) -> None:
    """The job trained with `patch` until the write of step HANGS hangs and the loop has gone
    past it (the row of the last step is logged), then killed: launcher and ranks at once."""
    marker = run.parent / "writing"

    def job() -> int:
        patch(marker)
        return cadence_main(["train", *as_sets(ASYNC), "--run-dir", str(run), "--nproc", "2"])

    child = Forked(job)
    deadline = time.monotonic() + 120
    while not (marker.exists() and _logged(run, 8)):
        assert child.poll() is None, child.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no hang at step {HANGS}, or no step 8 after it"
        time.sleep(0.01)
    for pid in reversed(process_tree(child.pid)):
        os.kill(pid, signal.SIGKILL)
    child.communicate()


def _logged(run: Path, step: int) -> bool:
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().split("\n")[:-1] if metrics.exists() else []
    return any(json.loads(line)["step"] >= step for line in lines if line.strip())


@FORKED_RANKS
@pytest.mark.parametrize(
    "patch", [_hang_in_dcp_writes, _hang_before_the_manifest], ids=["shards", "manifest"]
)
def test_a_kill_during_a_background_write_resumes_from_the_previous_checkpoint(
    runs: dict[str, Path], tmp_path: Path, patch: Callable[[Path], None]
) -> None:
    run = tmp_path / "run"
    crash_while_writing(patch, run)
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step_00000004" in saved and f"step_{HANGS:08d}" not in saved, saved
    (tmp,) = [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".step_00000006.")]
    assert list((tmp / "sharded").glob("__*_0.distcp")), "the shards were being written"
    # killed after DCP's metadata, the folder is a whole DCP checkpoint, but not cadence's
    assert (tmp / "sharded" / ".metadata").exists() == (patch is _hang_before_the_manifest)
    assert not (tmp / "checkpoint.json").exists()
    launch_here("train", "--resume", str(run), "--nproc", "2")
    assert_same_rows(rows(run), rows(runs["sync"]), rtol=0)
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert_same_weights(run / name, runs["sync"] / name, rtol=0, atol=0)


def _full_disk_on_rank_1(step: int) -> None:
    """Rank 1's DCP thread fails to write its shards of `step`, as on a full disk."""
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    original = _FileSystemWriter.write_data

    def write_data(self: Any, plan: Any, planner: Any) -> Any:
        if f"step_{step:08d}" in str(self.path) and os.environ.get("RANK") == "1":
            raise OSError(28, os.strerror(28), str(self.path))
        return original(self, plan, planner)

    _FileSystemWriter.write_data = write_data


@FORKED_RANKS
def test_a_failed_background_write_fails_every_rank_in_one_line(tmp_path: Path) -> None:
    # The error reaches rank 0 through DCP's write step; both raise it at the next save (step
    # 6), as the OSError it was, and the step-4 folder is gone, not half a checkpoint.
    run = tmp_path / "run"

    def job() -> int:
        _full_disk_on_rank_1(4)
        return cadence_main(["train", *as_sets(ASYNC), "--run-dir", str(run), "--nproc", "2"])

    child = Forked(job)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 1, out[-2000:] + err[-3000:]
    assert err.count("cadence: error: No space left on device") == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    assert _logged(run, 6) and not _logged(run, 7)
