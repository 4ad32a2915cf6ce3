"""The background batch reader: the batches it hands out are the ones asked for, always."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import cadence
from cadence.training.batches import Prefetcher

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reads_ahead_and_answers_any_request_correctly() -> None:
    calls: list[tuple[int, int, str]] = []

    def fetch(position: int, size: int) -> tuple[list, int]:
        calls.append((position, size, threading.current_thread().name))
        return [torch.arange(position, position + size)], size

    p = Prefetcher(fetch, torch.device("cpu"))
    try:
        got = [p.get(0, 4, 4), p.get(4, 4, 8), p.get(8, 8, 8)]  # a ramp: 4, 4, 8
        assert [b[0][0].tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7], list(range(8, 16))]
        assert p.hits == 2  # the 2nd and 3rd came from the background read
        # A rollback asks for an earlier batch: read in place of the one read ahead.
        assert p.get(4, 4, 4)[0][0].tolist() == [4, 5, 6, 7]
        assert p.hits == 2
        assert p.get(8, 4, 4)[0][0].tolist() == [8, 9, 10, 11] and p.hits == 3
    finally:
        p.close()
    background = [c for c in calls if c[2].startswith("cadence-prefetch")]
    assert (4, 4) in [c[:2] for c in background] and (0, 4, "MainThread") in calls


def test_an_error_in_the_wanted_batch_reaches_the_caller() -> None:
    def fetch(position: int, size: int) -> tuple[list, int]:
        if position == 3:
            raise ValueError("shard 7 is corrupt")
        return [torch.zeros(size)], size

    p = Prefetcher(fetch, torch.device("cpu"))
    try:
        p.get(0, 3, 3)
        with pytest.raises(ValueError, match="shard 7"):
            p.get(3, 3, 3)
        assert p.get(0, 3, 3)[1] == 3  # an unwanted batch's error is not raised
    finally:
        p.close()


def test_training_with_prefetch_gives_the_same_run(tmp_path) -> None:
    """Through a batch-size ramp: the size read ahead changes mid-run."""
    base = [
        "model.n_layer=1",
        "model.d_model=32",
        "model.n_head=2",
        "model.seq_len=16",
        "data.max_bytes=60000",
        "batch.size=8",
        "batch.schedule=[[0.0, 4], [0.5, 8]]",
        "train.max_steps=12",
        "train.eval_every=6",
        "train.eval_samples=16",
        "train.log_every=1",
        "train.progress=false",
    ]
    rows = {}
    for flag in ("false", "true"):
        cfg = cadence.load_config(None, [*base, f"train.prefetch={flag}"])
        cadence.train(cfg, run_dir=tmp_path / flag, plots=False)
        lines = (tmp_path / flag / "metrics.jsonl").read_text().splitlines()
        rows[flag] = [
            {k: r[k] for k in ("step", "batch_size", "train_loss", "grad_norm") if k in r}
            for r in map(json.loads, lines)
        ]
    assert rows["true"] == rows["false"]
    assert {r["batch_size"] for r in rows["true"]} == {4, 8}
