"""speech and asr under DDP on 2 CPU processes against one process: the same run.

Both models normalise each example on its own (GroupNorm, LayerNorm: no batch statistics), so
splitting the global batch over ranks, and into micro-batches, changes only the order of float
sums. SpecAugment and dropout are off here: they draw from each process's RNG, and two ranks
drawing masks for half a batch each cannot reproduce one process drawing them for all of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import as_sets

from .conftest import assert_same_rows, assert_same_weights, launch_here, rows, run_in_process

COMMON = [
    "data.voices=2",
    "model.augment=false",
    "optimizer.name=adamw",
    "optimizer.lr=0.003",
    "batch.size=9",
    "batch.micro_size=2",
    "schedule.warmup=2",
    "train.max_steps=6",
    "train.eval_every=3",
    "train.eval_samples=40",
    "train.threads=1",
    "train.progress=false",
    "train.log_every=1",
    "train.dist_timeout_s=60",
]
CASES = {
    "speech": ["workload=speech", "model.channels=[8,16]"],
    "asr": ["workload=asr", "model.d_model=32", "model.n_layer=1", "train.clip_grad_norm=1.0"],
}


@pytest.mark.parametrize("workload", list(CASES))
def test_two_processes_match_one(workload: str, tmp_path: Path) -> None:
    cfg = [*CASES[workload], *COMMON]
    run_in_process("train", *as_sets(cfg), "--run-dir", str(tmp_path / "one"))
    launch_here("train", *as_sets(cfg), "--run-dir", str(tmp_path / "two"), "--nproc", "2")
    got, want = rows(tmp_path / "two"), rows(tmp_path / "one")
    assert [r["step"] for r in got] == list(range(1, 7))
    assert_same_rows(got, want, rtol=1e-4)
    metric = "val_accuracy" if workload == "speech" else "val_cer"
    assert [r.get(metric) for r in got] == [r.get(metric) for r in want]
    # atol 1e-5: Adam divides by sqrt(v), so a parameter whose gradient is near zero (a bias
    # after GroupNorm) moves by lr * noise / |noise|, and summation-order noise shows at 1e-6
    assert_same_weights(
        tmp_path / "two" / "model.safetensors",
        tmp_path / "one" / "model.safetensors",
        rtol=1e-4,
        atol=1e-5,
    )
