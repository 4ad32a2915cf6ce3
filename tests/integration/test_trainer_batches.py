"""The trainer's batches: micro-batch accumulation, full-batch GD and the batch-size ramp.

A step must draw exactly the samples its batch size asks for, and accumulating micro-batches must
give the gradient, and the run, of one large batch. Each test runs a tiny model for a few steps;
every expected number comes from an independent computation in the test or from the same run with
another setting.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from trainer_helpers import Recorder, params_of, run_fit

import cadence
from cadence.config import ConfigError
from cadence.optim.packages import PACKAGE_OPTIMIZERS
from cadence.schedules import split_micro
from cadence.track.metrics import read_metrics
from cadence.training import Trainer, accumulate_gradients, fit
from cadence.workloads import build_workload

# ---------------------------------------------------------------- accumulation


@pytest.mark.parametrize("workload", ["mnist", "lm"])
def test_accumulated_gradients_equal_one_large_batch(make_config, workload: str) -> None:
    cfg = make_config(workload, "batch.size=12", "batch.micro_size=5", "optimizer.name=sgd")
    w = build_workload(cfg)
    trainer = Trainer(cfg, w)
    micro, units = trainer.next_batches(12)
    assert [len(m[0]) for m in micro] == split_micro(12, 5) == [5, 5, 2]

    model = w.model
    model.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, w.loss_sum, micro, units)
    accumulated = {k: p.grad.clone() for k, p in model.named_parameters()}

    # Reference: one forward/backward over the same 12 samples with a plain mean loss.
    x, y = w.batch(trainer.sampler.indices(0, 12))
    assert units == y.numel()  # samples for images, tokens for text
    model.zero_grad(set_to_none=True)
    logits = model(x)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    ref.backward()
    reference = {k: p.grad.clone() for k, p in model.named_parameters()}

    assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    assert_close(accumulated, reference, rtol=1e-4, atol=1e-6)


# sgd, and the optimizers taken from packages (they see only the accumulated gradient too):
# (overrides, the steps over which the runs agree to rounding). Summing micro-batches changes
# the gradient's rounding (~1e-7); Adam-type steps divide by sqrt(v), which lifts that to ~5e-6
# on weights whose gradient is near 0. SOAP rotates into the eigenbasis of a gradient covariance
# that has rank <= the step count early on, so its null space, where the two gradients differ
# by rounding alone, is any basis eigh returns: its runs agree exactly until its first
# preconditioned update, then within 2 %.
STEPS = 5
ACCUMULATING: dict[str, tuple[list[str], int]] = {
    "sgd": (["optimizer.lr=0.1", "optimizer.momentum=0.9"], STEPS),
    "prodigy": (["optimizer.lr=1.0"], STEPS),
    "dadapt-adam": (["optimizer.lr=1.0"], STEPS),
    "soap": (["optimizer.lr=0.003"], 2),
    "psgd-kron": (["optimizer.lr=0.001"], STEPS),
    "ademamix": (["optimizer.lr=0.003"], STEPS),
    "mars": (["optimizer.lr=0.003"], STEPS),
}


def test_the_accumulation_table_covers_the_package_optimizers() -> None:
    assert set(PACKAGE_OPTIMIZERS) <= set(ACCUMULATING)


@pytest.mark.parametrize("optimizer", list(ACCUMULATING))
def test_trainer_with_micro_batches_matches_one_batch(make_config, optimizer: str) -> None:
    overrides, exact = ACCUMULATING[optimizer]
    common = [
        f"optimizer.name={optimizer}",
        *overrides,
        "batch.size=12",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        f"train.eval_every={STEPS}",
    ]
    _, rows_one, tr_one = run_fit(make_config("mnist", *common))
    _, rows_acc, tr_acc = run_fit(make_config("mnist", *common, "batch.micro_size=5"))

    assert [r["step"] for r in rows_acc] == list(range(1, STEPS + 1))
    one, acc = ([r["train_loss"] for r in rows] for rows in (rows_one, rows_acc))
    np.testing.assert_allclose(acc[:exact], one[:exact], rtol=1e-5)
    np.testing.assert_allclose(acc[exact:], one[exact:], rtol=2e-2)
    # the first step's gradient is the accumulation's alone, before any optimizer state
    assert rows_acc[0]["grad_norm"] == pytest.approx(rows_one[0]["grad_norm"], rel=1e-4)
    if exact == STEPS:
        assert_close(params_of(tr_acc.model), params_of(tr_one.model), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- full batch


def test_full_batch_gd_sees_every_sample_once_per_step(make_config, monkeypatch) -> None:
    cfg = make_config(
        "logreg",
        "optimizer.name=gd",
        "optimizer.lr=1.0",
        "batch.size=full",
        "batch.micro_size=100",
        "train.max_steps=3",
    )
    w = build_workload(cfg)
    trainer = Trainer(cfg, w)
    seen: dict[int, list[torch.Tensor]] = defaultdict(list)
    original = w.batch

    def spy(indices: torch.Tensor):
        seen[trainer.state.step].append(indices.clone())
        return original(indices)

    monkeypatch.setattr(w, "batch", spy)
    fit(trainer)

    assert sorted(seen) == [0, 1, 2]
    for parts in seen.values():
        assert len(parts) == math.ceil(w.n_train / 100)
        everything = torch.cat(parts)
        assert torch.equal(everything.sort().values, torch.arange(w.n_train))


# ---------------------------------------------------------------- batch ramp


def test_batch_ramp_switches_size_and_scales_lr(make_config, monkeypatch) -> None:
    lr, base, big, frac, steps = 0.1, 8, 16, 0.5, 10
    cfg = make_config(
        "logreg",
        "optimizer.name=sgd",
        f"optimizer.lr={lr}",
        f"batch.size={base}",
        f"batch.schedule=[[{frac}, {big}]]",
        "batch.lr_scaling=sqrt",
        f"train.max_steps={steps}",
        "train.log_every=1",
    )
    w = build_workload(cfg)
    trainer = Trainer(cfg, w, [rec := Recorder()])
    drawn: dict[int, int] = defaultdict(int)
    original = w.batch

    def spy(indices: torch.Tensor):
        drawn[trainer.state.step + 1] += len(indices)
        return original(indices)

    monkeypatch.setattr(w, "batch", spy)
    summary = fit(trainer)

    switch = math.ceil(frac * steps)  # the first step index t (0-based) of the new stage
    samples = 0
    for r in rec.rows:
        grown = r["step"] - 1 >= switch
        size = big if grown else base
        samples += size
        assert r["batch_size"] == size == drawn[r["step"]], r
        assert r["samples"] == samples
        expected_lr = lr * math.sqrt(big / base) if grown else lr
        assert r["lr"] == pytest.approx(expected_lr, rel=1e-12)
    assert [r["batch_size"] for r in rec.rows].count(base) == switch
    assert summary["samples"] == switch * base + (steps - switch) * big


# ---------------------------------------------------------------- batch.schedule: auto


def _auto(make_config, *extra: str):
    return make_config(
        "digits", "optimizer.name=sgd", "optimizer.lr=0.05", "batch.size=4",
        "batch.schedule=auto", "batch.max_size=32", "train.noise_scale_every=3",
        "train.max_steps=30", "train.eval_every=100", "train.log_every=1", *extra,
    )  # fmt: skip


def test_auto_batch_follows_its_rule_on_the_logged_noise_scale(make_config) -> None:
    """A bare Trainer (nothing attached but a recorder) measures and decides by itself."""
    cfg = _auto(make_config)
    rec = Recorder()
    trainer = Trainer(cfg, build_workload(cfg), [rec])
    fit(trainer)
    rows = rec.rows
    sizes = [r["batch_size"] for r in rows]
    assert sizes[0] == 4 and sizes[-1] > 4, sizes  # it grew (digits' B_simple is ~100)
    measured = [r for r in rows if "noise_scale" in r]
    assert [r["step"] for r in measured] == list(range(3, 31, 3))
    for i, r in enumerate(measured):
        current = r["batch_size"]
        bigger = min(2 * current, 32)
        b_crit = r["noise_scale"]
        due = i >= 1 and bigger > current and math.isfinite(b_crit) and b_crit >= bigger
        assert r.get("batch_target") == (bigger if due else None), r
    by_step = {r["step"]: r["batch_size"] for r in rows}
    for step, size in trainer.ramp.decisions:  # a decision after step s sizes step s + 1
        assert by_step[step] < size and by_step.get(step + 1, size) == size
    # the LR follows by the sqrt rule (batch.lr_scaling default) under the constant schedule
    for r in rows:
        assert r["lr"] == pytest.approx(0.05 * math.sqrt(r["batch_size"] / 4), rel=1e-12)


def test_auto_batch_decides_the_same_from_every_entry_point(make_config, tmp_path) -> None:
    """The decision is a step of the loop: cadence.train and a bare Trainer, with nothing
    attached, grow the batch at the same steps."""
    cfg = _auto(make_config)
    trainer = Trainer(cfg, build_workload(cfg))
    fit(trainer)
    assert trainer.ramp.decisions, "the batch never grew"
    cadence.train(cfg, run_dir=tmp_path / "run", plots=False)
    by_step = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")}
    grown = [(s, r["batch_target"]) for s, r in by_step.items() if "batch_target" in r]
    assert grown == [tuple(d) for d in trainer.ramp.decisions]
    # noise_scale.jsonl holds each measurement once, as the rows do
    lines = (tmp_path / "run" / "noise_scale.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(3, 31, 3))


def test_auto_batch_is_refused_for_full_batch_and_max_size_alone(make_config) -> None:
    with pytest.raises(ConfigError, match=r"^batch\.schedule: a batch ramp needs an integer"):
        make_config("logreg", "optimizer.name=gd", "batch.size=full", "batch.schedule=auto")
    with pytest.raises(ConfigError, match=r"^batch\.max_size: bounds batch\.schedule: auto"):
        make_config("digits", "batch.max_size=64")
    with pytest.raises(ConfigError, match=r"^batch\.max_size: must be an integer >= batch.size"):
        make_config("digits", "batch.size=32", "batch.schedule=auto", "batch.max_size=16")
