"""The tuning tools reached through a training config: `optimizer.lr: auto`, noise-scale logging."""

from __future__ import annotations

import json

import torch
import yaml

import cadence
from cadence.tune import suggest_lr

TINY = [
    "workload=digits",
    "model.hidden=[32]",
    "optimizer.name=sgd",
    "schedule.name=constant",
    "schedule.warmup=0",
    "train.max_steps=20",
    "train.eval_every=10",
    "train.log_every=5",
    "train.progress=false",
    "train.threads=1",
    "batch.size=32",
]


def test_lr_auto_runs_the_range_test_and_records_the_choice(tmp_path):
    torch.manual_seed(0)
    cfg = cadence.load_config(None, [*TINY, "optimizer.lr=auto"])
    summary = cadence.train(cfg, run_dir=tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    chosen = saved["optimizer"]["lr"]
    assert isinstance(chosen, float) and chosen > 0
    # The recorded LR is the range test's suggestion for the same config, and it was used.
    assert chosen == suggest_lr(cadence.load_config(None, [*TINY, "optimizer.lr=auto"]))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["lr"] == chosen for r in rows)
    report = json.loads((tmp_path / "run" / "lr_find.json").read_text())
    assert report["suggestion"] == chosen
    assert (tmp_path / "run" / "plots" / "lr_find.png").stat().st_size > 0
    assert summary["steps"] == 20


def test_log_noise_scale_adds_it_to_metrics_without_changing_training(tmp_path):
    plain = cadence.train(cadence.load_config(None, [*TINY, "optimizer.lr=0.1"]), tmp_path / "a")
    cfg = cadence.load_config(
        None,
        [*TINY, "optimizer.lr=0.1", "train.log_noise_scale=true", "train.noise_scale_every=10"],
    )
    noisy = cadence.train(cfg, run_dir=tmp_path / "b")
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if "noise_scale" in r]
    assert [r["step"] for r in measured] == [10, 20]
    assert all(r["noise_scale"] > 0 for r in measured)
    assert noisy["final_train_loss"] == plain["final_train_loss"]
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_noise_scale_every_is_its_own_cadence_and_writes_noise_scale_jsonl(tmp_path):
    """Measurements fall on every `noise_scale_every`-th step, log step or not, and land both
    in that step's metrics row and in noise_scale.jsonl."""
    cfg = cadence.load_config(
        None,
        [*TINY, "optimizer.lr=0.1", "train.log_noise_scale=true", "train.noise_scale_every=3"],
    )
    cadence.train(cfg, run_dir=tmp_path / "run")
    lines = (tmp_path / "run" / "noise_scale.jsonl").read_text().splitlines()
    measured = [json.loads(x) for x in lines]
    assert [m["step"] for m in measured] == list(range(3, 21, 3))
    rows = {
        r["step"]: r
        for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    }
    for m in measured:
        assert rows[m["step"]]["noise_scale"] == m["noise_scale"]
    # The other rows are the ordinary log cadence (every 5 steps) and nothing else.
    assert sorted(rows) == sorted({*range(5, 21, 5), *range(3, 21, 3)})
