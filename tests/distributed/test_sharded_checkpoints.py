"""FSDP2 runs with Muon and EMA: sharded DCP checkpoints, resume, and export consolidation.

The run here uses the two features that need whole matrices or extra state under FSDP2: Muon
(orthogonalises gathered matrices, see test_sharded_muon.py for the exact reference check) and
the EMA of weights (a sharded shadow). Its checkpoints are torch.distributed.checkpoint folders,
one shard file per rank, and must
- resume on the same number of processes bit for bit (same reductions, same order),
- resume on another number of processes as the same run within float tolerance,
- consolidate into one safetensors file equal to the weights the run itself gathered,
- be passed over with a warning when a shard file is damaged.

Tolerance against a one-process run: Muon orthogonalises in bfloat16 on accelerators (float32
on CPU), so the last-bit differences that the order of the gradient reduction makes (see
test_ddp_fsdp.py, 1e-5) can move an orthogonalised entry by one bf16 step, 2**-8 relative; losses
are compared at that precision, which holds on either device.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cadence.cli import main as cadence_main
from cli_helpers import as_sets

from .conftest import (
    LM,
    assert_same_rows,
    assert_same_weights,
    launch_here,
    rows,
    run_in_process,
    truncated_copy,
)

BF16_RTOL = 2.0**-8
CFG = [
    *LM,
    "optimizer.name=muon",
    "train.ema=0.9",
    "train.distributed=fsdp",
    "train.max_steps=8",
    "train.eval_every=4",
    "train.checkpoint_every=4",
    "train.keep_checkpoints=10",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    one, two = root / "one", root / "two"
    run_in_process("train", *as_sets(CFG), "--run-dir", str(one))
    launch_here("train", *as_sets(CFG), "--run-dir", str(two), "--nproc", "2")
    return {"root": root, "one": one, "two": two}


def test_muon_and_ema_under_fsdp_match_one_process(runs: dict[str, Path]) -> None:
    got, want = rows(runs["two"]), rows(runs["one"])
    assert [r["step"] for r in got] == list(range(1, 9))
    assert_same_rows(got, want, rtol=BF16_RTOL)
    for step in (4, 8):
        a = next(r for r in got if r["step"] == step)
        b = next(r for r in want if r["step"] == step)
        assert a["ema_val_loss"] == pytest.approx(b["ema_val_loss"], rel=BF16_RTOL)


def test_checkpoints_are_sharded_one_file_per_rank(runs: dict[str, Path]) -> None:
    ckpt = runs["two"] / "checkpoints" / "step_00000004"
    manifest = json.loads((ckpt / "checkpoint.json").read_text())
    assert (manifest["layout"], manifest["world_size"], manifest["step"]) == ("sharded", 2, 4)
    on_disk = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    shards = ["sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"]
    assert on_disk == sorted(["checkpoint.json", "trainer.pt", *shards])
    assert sorted(manifest["files"]) == sorted(["trainer.pt", *shards])
    # No rank wrote a whole matrix: DCP's index has two row blocks of each, one per file.
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(ckpt / "sharded").read_metadata()
    files_of: dict[str, set[str]] = {}
    for index, info in meta.storage_data.items():
        files_of.setdefault(index.fqn, set()).add(info.relative_path)
    matrices = [k for k, m in meta.state_dict_metadata.items() if len(getattr(m, "size", ())) == 2]
    assert any(k.startswith("optim/") for k in matrices) and any(
        k.startswith("ema/") for k in matrices
    )
    for key in matrices:
        chunks = meta.state_dict_metadata[key].chunks
        assert [c.offsets[0] for c in chunks] == [0, chunks[0].sizes[0]], key
        assert files_of[key] == {"__0_0.distcp", "__1_0.distcp"}, key
    one = json.loads((runs["one"] / "checkpoints/step_00000004/checkpoint.json").read_text())
    assert (one["layout"], one["world_size"]) == ("sharded", 1)


def test_resume_on_the_same_processes_is_exact(runs: dict[str, Path], tmp_path: Path) -> None:
    resumed = truncated_copy(runs["two"], tmp_path / "run", step=4)
    launch_here("train", "--resume", str(resumed), "--nproc", "2")
    assert_same_rows(rows(resumed), rows(runs["two"]), rtol=0)
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert_same_weights(resumed / name, runs["two"] / name, rtol=0, atol=0)


@pytest.mark.parametrize("direction", ["2->1", "1->2"])
def test_resume_on_other_processes(runs: dict[str, Path], tmp_path: Path, direction: str) -> None:
    source, other = (runs["two"], runs["one"]) if direction == "2->1" else (runs["one"], None)
    resumed = truncated_copy(source, tmp_path / "run", step=4)
    if direction == "2->1":
        run_in_process("train", "--resume", str(resumed))
    else:
        launch_here("train", "--resume", str(resumed), "--nproc", "2")
    got = rows(resumed)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert_same_rows(got, rows(other or runs["two"]), rtol=BF16_RTOL)


def _export(*args: str) -> None:
    assert cadence_main(["export", *args, "--format", "safetensors"]) == 0


def _equal_files(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert sorted(x) == sorted(y)
    for name in x:
        assert torch.equal(x[name], y[name]), name


def test_export_consolidates_a_sharded_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    two = runs["two"]
    # The final checkpoint holds the final weights: consolidating its shards on one process gives
    # exactly the file the run gathered across its processes.
    _export(str(two), "--checkpoint", "latest", "--out", str(tmp_path / "final"))
    _equal_files(tmp_path / "final/model.safetensors", two / "model.safetensors")
    _export(str(two), "--checkpoint", "8", "--ema", "--out", str(tmp_path / "ema"))
    _equal_files(tmp_path / "ema/model.safetensors", two / "model_ema.safetensors")
    # An earlier checkpoint: its weights give the validation loss the run logged at that step.
    _export(str(two), "--checkpoint", "step_00000004", "--out", str(tmp_path / "early"))
    from cadence.deploy import load_run
    from cadence.run import load_config
    from cadence.workloads import build_workload

    loaded = load_run(tmp_path / "early")
    workload = build_workload(load_config(two / "config.yaml"), tokenizer_dir=two)
    logged = next(r["val_loss"] for r in rows(two) if r["step"] == 4)
    assert workload.evaluate(loaded.model)["val_loss"] == pytest.approx(logged, rel=1e-5)


def test_damaged_shard_is_passed_over(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resumed = tmp_path / "run"
    shutil.copytree(runs["two"], resumed)
    for name in ("model.safetensors", "model_ema.safetensors", "summary.json"):
        (resumed / name).unlink()
    shard = resumed / "checkpoints/step_00000008/sharded/__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    run_in_process("train", "--resume", str(resumed))
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "__1_0.distcp: checksum mismatch" in out, out
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 8
    assert [r["step"] for r in rows(resumed)] == list(range(1, 9))


def test_adafactor_state_resumes_from_shards_on_one_process(tmp_path: Path) -> None:
    # Adafactor keeps whole, replicated state under FSDP2 (cadence.optim.sharded): DCP stores it
    # once and a one-process resume continues the two-process run.
    cfg = [*LM, "optimizer.name=adafactor", "train.distributed=fsdp", "train.max_steps=6"]
    cfg += ["train.eval_every=3", "train.checkpoint_every=3"]
    two = tmp_path / "two"
    launch_here("train", *as_sets(cfg), "--run-dir", str(two), "--nproc", "2")
    resumed = truncated_copy(two, tmp_path / "resumed", step=3)
    run_in_process("train", "--resume", str(resumed))
    assert_same_rows(rows(resumed), rows(two))
    assert_same_weights(resumed / "model.safetensors", two / "model.safetensors")
