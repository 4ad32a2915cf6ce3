"""Private training (DP-SGD) on 2 processes against one: the same draws, the same noise.

Every rank draws the same Poisson batch and keeps its share; the clipped per-example sums are
added across ranks before the one noise draw, which each rank makes from the same seeded
generator. So two processes differ from one only in the order of float additions.
"""

from __future__ import annotations

import json

import pytest

from cli_helpers import as_sets

from .conftest import (
    DIGITS,
    assert_same_rows,
    assert_same_weights,
    launch_here,
    rows,
    run_in_process,
)


def test_two_processes_match_one_privately(tmp_path) -> None:
    cfg = [*DIGITS, "batch.size=32", "train.max_steps=6", "train.eval_every=3"]
    cfg += ["privacy.enabled=true", "privacy.target_epsilon=3", "privacy.accountant=rdp"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_in_process("train", *as_sets(cfg), "--run-dir", str(one))
    launch_here("train", *as_sets(cfg), "--run-dir", str(two), "--nproc", "2")
    assert_same_rows(rows(two), rows(one))
    assert_same_weights(two / "model.safetensors", one / "model.safetensors")
    a, b = (json.loads((d / "summary.json").read_text())["privacy"] for d in (one, two))
    assert a == b  # the same noise multiplier, sampling rate and ε


def test_fsdp_is_refused_in_one_line(tmp_path) -> None:
    cfg = [*DIGITS, "privacy.enabled=true", "privacy.target_epsilon=3", "train.distributed=fsdp"]
    run = tmp_path / "run"
    with pytest.raises(AssertionError, match="train.distributed: fsdp does not run privately"):
        launch_here("train", *as_sets(cfg), "--run-dir", str(run), "--nproc", "2")
    assert not run.exists()
