"""What a run leaves behind: reproducible bytes, the metrics.jsonl contract, checkpoints.

The same seed must give the same losses and weights; metrics.jsonl, summary.json, the plots,
TensorBoard events, config.yaml and the rotated checkpoints must hold what the run did.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from safetensors.torch import load_file, load_model

import cadence
from cadence.schedules import build_schedule
from cadence.track.metrics import read_metrics
from cadence.workloads import build_workload

# ---------------------------------------------------------------- determinism


def test_same_seed_is_bitwise_reproducible_and_another_seed_is_not(make_config, tmp_path) -> None:
    def run(seed: int, name: str) -> tuple[list[float], bytes]:
        cfg = make_config(
            "mnist",
            "optimizer.name=adamw",
            "batch.size=32",
            "train.max_steps=6",
            "train.log_every=1",
            "train.eval_every=3",
            f"train.seed={seed}",
        )
        cadence.train(cfg, run_dir=tmp_path / name)
        losses = [r["train_loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")]
        return losses, (tmp_path / name / "model.safetensors").read_bytes()

    losses_a, model_a = run(0, "a")
    losses_b, model_b = run(0, "b")
    losses_c, model_c = run(1, "c")
    assert len(losses_a) == 6
    assert losses_a == losses_b
    assert model_a == model_b
    assert losses_c != losses_a
    assert model_c != model_a


# ---------------------------------------------------------------- metrics.jsonl contract


def test_metrics_jsonl_and_run_directory_contract(make_config, tmp_path) -> None:
    lr, steps, warmup, batch, eval_every = 3e-3, 7, 2, 4, 3
    cfg = make_config(
        "lm",
        "optimizer.name=adamw",
        f"optimizer.lr={lr}",
        "schedule.name=cosine",
        f"schedule.warmup={warmup}",
        "schedule.min_lr_ratio=0.1",
        f"batch.size={batch}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        f"train.eval_every={eval_every}",
    )
    run_dir = tmp_path / "run"
    summary = cadence.train(cfg, run_dir=run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    schedule = build_schedule(
        "cosine", total_steps=steps, warmup=warmup, min_lr_ratio=cfg.schedule.min_lr_ratio
    )
    seq_len = cfg.model.seq_len

    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    required = {"step", "samples", "lr", "batch_size", "train_loss", "grad_norm", "time_s"}
    for r in rows:
        assert required | {"tokens"} <= set(r), r
        assert r["samples"] == r["step"] * batch
        assert r["tokens"] == r["samples"] * seq_len
        assert r["batch_size"] == batch
        assert r["lr"] == pytest.approx(lr * schedule(r["step"] - 1), rel=1e-12)
        assert math.isfinite(r["train_loss"]) and r["grad_norm"] > 0
        evaluated = r["step"] % eval_every == 0 or r["step"] == steps
        assert ("val_loss" in r) == evaluated, r
    assert rows[0]["lr"] == pytest.approx(lr / warmup)  # warmup reaches 1 on its last step
    times = [r["time_s"] for r in rows]
    assert times == sorted(times) and times[0] >= 0

    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors"):
        assert (run_dir / name).is_file(), name
    for name in ("loss.png", "lr.png"):
        assert (run_dir / "plots" / name).stat().st_size > 0, name
    assert any(p.is_file() for p in (run_dir / "tensorboard").rglob("*"))
    # No periodic checkpoints were asked for: only the final one, which makes any run resumable.
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step_{steps:08d}"]
    assert cadence.load_config(run_dir / "config.yaml").to_dict() == cfg.to_dict()

    val_losses = [r["val_loss"] for r in rows if "val_loss" in r]
    assert summary["steps"] == steps and summary["samples"] == steps * batch
    assert summary["tokens"] == steps * batch * seq_len
    assert summary["final_train_loss"] == rows[-1]["train_loss"]
    assert summary["best_val_loss"] == min(val_losses)
    assert summary["target_step"] is None
    w = build_workload(cfg)
    assert summary["params"] == sum(p.numel() for p in w.model.parameters())
    # The final weights load strictly into a fresh model (tied embeddings are stored once).
    missing, unexpected = load_model(w.model, run_dir / "model.safetensors")
    assert not missing and not unexpected
    assert w.evaluate(w.model)["val_loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-6)


# ---------------------------------------------------------------- checkpoints


def test_checkpoints_are_written_rotated_and_load_weights_only(make_config, tmp_path) -> None:
    every, steps, keep = 2, 9, 3
    cfg = make_config(
        "digits",
        "optimizer.name=adamw",
        "batch.size=32",
        f"train.max_steps={steps}",
        "train.eval_every=3",
        f"train.checkpoint_every={every}",
        "train.ema=0.9",
        "plateau.enabled=true",
    )
    run_dir = tmp_path / "run"
    cadence.train(cfg, run_dir=run_dir)
    saved_at = sorted({s for s in range(1, steps + 1) if s % every == 0} | {steps})
    expected = [f"step_{s:08d}" for s in saved_at[-keep:]]
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == expected  # no temporaries left either
    for name in expected:
        folder = root / name
        assert {p.name for p in folder.iterdir()} == {
            "model.safetensors",
            "trainer.pt",
            "checkpoint.json",
        }
        state = torch.load(folder / "trainer.pt", weights_only=True)
        assert state["train_state"]["step"] == int(name.removeprefix("step_"))
        assert {"optimizer", "smoother", "rng", "plateau", "ema"} <= set(state)
    last = load_file(root / expected[-1] / "model.safetensors")
    final = load_file(run_dir / "model.safetensors")
    assert set(last) == set(final)
    assert all(torch.equal(last[k], final[k]) for k in final)


# ---------------------------------------------------------------- time accounting


def test_training_time_excludes_evaluation_and_checkpoints(
    make_config, tmp_path, monkeypatch
) -> None:
    """A slow evaluation adds to wall time but not to training time, throughput or the time a
    comparison charges for reaching the target."""
    from cadence.bench.profiles import time_to_target
    from cadence.workloads import ClassificationWorkload

    pause = 0.2
    evaluate = ClassificationWorkload.evaluate

    def slow(self, model, world=None):
        time.sleep(pause)
        return evaluate(self, model, world)

    monkeypatch.setattr(ClassificationWorkload, "evaluate", slow)
    steps = 4
    cfg = make_config(
        "digits",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.eval_every=1",
        "train.checkpoint_every=2",
        "train.target=0.0",  # reached at the first evaluation
        "train.stop_at_target=false",
    )
    summary = cadence.train(cfg, run_dir=tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert summary["eval_time_s"] >= steps * pause
    assert summary["checkpoint_time_s"] > 0
    parts = summary["train_time_s"] + summary["eval_time_s"] + summary["checkpoint_time_s"]
    # Wall time also holds the logging after the last step, which training time counts only for
    # steps that follow it.
    assert parts <= summary["wall_time_s"] < parts + pause
    # Each row's training time leaves out every evaluation before it: (step - 1) pauses.
    for r in rows:
        assert r["time_s"] - r["train_time_s"] >= (r["step"] - 1) * pause
    assert summary["samples_per_s"] == pytest.approx(
        summary["samples"] / summary["train_time_s"], rel=1e-9
    )
    assert summary["target_step"] == 1
    assert time_to_target(rows, 1)["time"] == rows[0]["train_time_s"]
    assert summary["train_time_s"] < steps * pause  # the pauses are not in it
