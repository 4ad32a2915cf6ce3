"""End-to-end checks of the trainer against closed forms and independent reference computations.

Each test runs a tiny model for a handful of steps; every expected number comes from a formula,
from an independent computation in the test, or from the same run with another setting.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model
from torch.testing import assert_close

import cadence
from cadence.config import Config
from cadence.data import logreg_grad, logreg_loss
from cadence.optim import OPTIMIZERS
from cadence.schedules import Plateau, build_schedule, split_micro
from cadence.track.metrics import read_metrics
from cadence.training import Callback, Trainer, accumulate_gradients, fit
from cadence.workloads import Workload, build_workload

# ---------------------------------------------------------------- helpers


class Recorder(Callback):
    """Keeps every logged row and the trainer; observes only."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.trainer: Any = None

    def on_start(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_log(self, trainer: Any, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))


def run_fit(cfg: Config, workload: Workload | None = None) -> tuple[dict, list[dict], Trainer]:
    """Trainer + fit without a run directory; returns (summary, logged rows, trainer)."""
    rec = Recorder()
    trainer = Trainer(cfg, workload if workload is not None else build_workload(cfg), [rec])
    summary = fit(trainer)
    return summary, rec.rows, trainer


def theta_of(workload: Workload) -> np.ndarray:
    """Logistic-regression parameters as theta = [w..., b] (float64), the layout of logreg_*."""
    lin = workload.model.linear
    return torch.cat([lin.weight.detach().flatten(), lin.bias.detach()]).double().numpy().copy()


def smoothness(workload: Workload) -> float:
    """L = lambda_max(X~^T X~) / (4n) + l2 bounds the Hessian of J (X~ = [X, 1], sigma' <= 1/4)."""
    x = workload.x_train.double().numpy()
    xb = np.hstack([x, np.ones((x.shape[0], 1))])
    return float(np.linalg.eigvalsh(xb.T @ xb).max()) / (4 * x.shape[0]) + workload.l2


def num(x: float) -> str:
    """``x`` spelled so that YAML reads it back as a float (PyYAML takes ``1e-12`` for a string)."""
    mantissa, e, exponent = repr(float(x)).partition("e")
    if e and "." not in mantissa:
        mantissa += ".0"
    return mantissa + e + exponent


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------- 1. accumulation


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


def test_trainer_with_micro_batches_matches_one_batch(make_config) -> None:
    common = [
        "optimizer.name=sgd",
        "optimizer.lr=0.1",
        "optimizer.momentum=0.9",
        "batch.size=12",
        "train.max_steps=5",
        "train.log_every=1",
        "train.eval_every=5",
    ]
    _, rows_one, tr_one = run_fit(make_config("mnist", *common))
    _, rows_acc, tr_acc = run_fit(make_config("mnist", *common, "batch.micro_size=5"))

    assert [r["step"] for r in rows_acc] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(
        [r["train_loss"] for r in rows_acc], [r["train_loss"] for r in rows_one], rtol=1e-5
    )
    np.testing.assert_allclose(
        [r["grad_norm"] for r in rows_acc], [r["grad_norm"] for r in rows_one], rtol=1e-4
    )
    assert_close(params_of(tr_acc.model), params_of(tr_one.model), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- 2. full batch


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


# ---------------------------------------------------------------- 3. GD closed form


def test_gd_on_logreg_matches_closed_form_update(make_config) -> None:
    lr, steps = 0.5, 5
    cfg = make_config(
        "logreg",
        "optimizer.name=gd",
        f"optimizer.lr={lr}",
        "batch.size=full",
        f"train.max_steps={steps}",
        "train.log_every=1",
    )
    w = build_workload(cfg)
    x, y = w.x_train.double().numpy(), w.y_train.double().numpy()
    theta = theta_of(w)
    expected_losses, expected_norms = [], []
    for _ in range(steps):
        g = logreg_grad(x, y, theta, w.l2)
        expected_losses.append(logreg_loss(x, y, theta, w.l2))
        expected_norms.append(float(np.linalg.norm(g)))
        theta = theta - lr * g

    _, rows, _ = run_fit(cfg, w)
    np.testing.assert_allclose(theta_of(w), theta, rtol=1e-10, atol=1e-12)
    # Each row reports the loss and gradient norm at the weights the step started from.
    np.testing.assert_allclose([r["train_loss"] for r in rows], expected_losses, rtol=1e-10)
    np.testing.assert_allclose([r["grad_norm"] for r in rows], expected_norms, rtol=1e-10)


def test_gd_with_step_one_over_l_decreases_suboptimality_monotonically(make_config) -> None:
    probe = build_workload(make_config("logreg"))
    big_l = smoothness(probe)
    x, y = probe.x_train.double().numpy(), probe.y_train.double().numpy()
    j0 = logreg_loss(x, y, theta_of(probe), probe.l2)
    cfg = make_config(
        "logreg",
        "optimizer.name=gd",
        f"optimizer.lr={num(1 / big_l)}",
        "batch.size=full",
        "train.max_steps=150",
        "train.log_every=1",
        "train.eval_every=1",
    )
    _, rows, _ = run_fit(cfg)
    gaps = [r["suboptimality"] for r in rows]
    assert len(gaps) == 150
    assert gaps[0] < j0 - probe.j_star
    assert all(b < a for a, b in zip(gaps, gaps[1:]))
    # The descent lemma: J(theta_k+1) <= J(theta_k) - |grad J(theta_k)|^2 / (2L).
    for prev, nxt in zip(rows, rows[1:]):
        bound = prev["train_loss"] - prev["grad_norm"] ** 2 / (2 * big_l)
        assert nxt["train_loss"] <= bound + 1e-12


# ---------------------------------------------------------------- 4. determinism


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


# ---------------------------------------------------------------- 5. metrics.jsonl contract


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


# ---------------------------------------------------------------- 6. stopping


def test_target_stops_the_run_or_is_only_recorded(make_config) -> None:
    common = [
        "optimizer.name=adamw",
        "optimizer.lr=0.003",
        "batch.size=32",
        "train.eval_every=5",
        "train.log_every=5",
        "train.target=0.5",
    ]
    summary, rows, _ = run_fit(make_config("mnist", *common, "train.max_steps=300"))
    hit = summary["target_step"]
    assert summary["stop_reason"] == "target"
    assert hit is not None and summary["steps"] == hit < 300
    accuracies = [r["val_accuracy"] for r in rows]
    assert accuracies[-1] >= 0.5 and all(a < 0.5 for a in accuracies[:-1])

    # Same seed, same trajectory: the target is recorded at the same step and training goes on.
    cfg = make_config("mnist", *common, f"train.max_steps={hit + 10}", "train.stop_at_target=false")
    summary, _, _ = run_fit(cfg)
    assert summary["target_step"] == hit
    assert summary["stop_reason"] == "max_steps"
    assert summary["steps"] == hit + 10


def test_early_stopping_counts_evaluations_without_improvement(make_config) -> None:
    patience, eval_every = 3, 2
    cfg = make_config(
        "digits",
        "optimizer.name=sgd",
        f"optimizer.lr={num(1e-12)}",  # far below float32 resolution: the weights never change
        "batch.size=32",
        "train.max_steps=100",
        f"train.eval_every={eval_every}",
        f"train.log_every={eval_every}",
        f"train.early_stop_patience={patience}",
    )
    summary, rows, _ = run_fit(cfg)
    assert summary["stop_reason"] == "early_stop"
    # The first evaluation sets the best; `patience` more without improvement stop the run.
    assert summary["steps"] == eval_every * (patience + 1)
    assert len({r["val_accuracy"] for r in rows}) == 1
    assert summary["best_step"] == eval_every


def test_gradient_norm_tolerance_stops_gd(make_config) -> None:
    probe = build_workload(make_config("logreg"))
    x, y = probe.x_train.double().numpy(), probe.y_train.double().numpy()
    tol = float(np.linalg.norm(logreg_grad(x, y, theta_of(probe), probe.l2))) / 10
    cfg = make_config(
        "logreg",
        "optimizer.name=gd",
        f"optimizer.lr={num(1 / smoothness(probe))}",
        "batch.size=full",
        "train.max_steps=5000",
        "train.log_every=1",
        "train.eval_every=5000",
        f"train.tol_grad_norm={num(tol)}",
    )
    summary, rows, _ = run_fit(cfg)
    assert summary["stop_reason"] == "converged_grad_norm"
    assert summary["steps"] == len(rows) < 5000
    assert rows[-1]["grad_norm"] < tol
    assert all(r["grad_norm"] >= tol for r in rows[:-1])


# ---------------------------------------------------------------- 7. plateau


def test_plateau_scale_follows_a_replayed_plateau(make_config, tmp_path) -> None:
    lr, steps = 0.2, 40
    cfg = make_config(
        "logreg",
        "optimizer.name=sgd",
        f"optimizer.lr={lr}",
        "batch.size=64",
        "schedule.name=cosine",
        "schedule.min_lr_ratio=0.1",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.eval_every=2",
        "plateau.enabled=true",
        "plateau.monitor=val_loss",
        "plateau.patience=1",
        "plateau.threshold=0.05",
        "plateau.factor=0.5",
        "plateau.cooldown=1",
    )
    cadence.train(cfg, run_dir=tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    p = cfg.plateau
    replay = Plateau(
        factor=p.factor,
        patience=p.patience,
        threshold=p.threshold,
        cooldown=p.cooldown,
        min_scale=p.min_scale,
    )
    schedule = build_schedule("cosine", total_steps=steps, min_lr_ratio=cfg.schedule.min_lr_ratio)
    scale_used = 1.0  # the scale in force when the step ran: set by evaluations before it
    for r in rows:
        assert r["lr"] == pytest.approx(lr * schedule(r["step"] - 1) * scale_used, rel=1e-12)
        if "val_loss" in r:
            replay.update(r["val_loss"])
        assert r["plateau_scale"] == replay.scale, r["step"]
        scale_used = r["plateau_scale"]
    assert len(rows) == steps
    assert replay.num_reductions >= 1  # otherwise the test would prove nothing


# ---------------------------------------------------------------- 8. batch ramp


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


# ---------------------------------------------------------------- 9. EMA


class EMAReference(Callback):
    """shadow <- d * shadow + (1 - d) * params after every step, in float64."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        self.final: dict[str, torch.Tensor] = {}

    def on_start(self, trainer: Any) -> None:
        self.shadow = {k: v.double() for k, v in params_of(trainer.model).items()}

    def on_log(self, trainer: Any, row: dict[str, Any]) -> None:
        for k, v in trainer.model.named_parameters():
            self.shadow[k] = self.decay * self.shadow[k] + (1 - self.decay) * v.detach().double()

    def on_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        self.final = params_of(trainer.model)


def test_ema_weights_are_saved_and_evaluated(make_config, tmp_path) -> None:
    decay = 0.9
    cfg = make_config(
        "digits",
        "optimizer.name=sgd",
        "optimizer.lr=0.1",
        "optimizer.momentum=0.9",
        "batch.size=32",
        "train.max_steps=10",
        "train.log_every=1",  # the reference updates once per logged row, i.e. every step
        "train.eval_every=5",
        f"train.ema={decay}",
    )
    ref = EMAReference(decay)
    cadence.train(cfg, run_dir=tmp_path / "run", callbacks=[ref])
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    ema = load_file(tmp_path / "run" / "model_ema.safetensors")
    final = load_file(tmp_path / "run" / "model.safetensors")

    assert_close(ema, {k: v.float() for k, v in ref.shadow.items()}, rtol=1e-5, atol=1e-6)
    assert_close(final, ref.final, rtol=0, atol=0)
    assert any(not torch.allclose(ema[k], final[k]) for k in final)

    eval_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in eval_rows] == [5, 10]
    assert all("ema_val_loss" in r for r in eval_rows)
    assert not any("ema_val_loss" in r for r in rows if "val_loss" not in r)
    # The reported ema_val_loss is the validation loss of the saved EMA weights.
    w = build_workload(cfg)
    load_model(w.model, tmp_path / "run" / "model_ema.safetensors")
    assert eval_rows[-1]["ema_val_loss"] == pytest.approx(w.evaluate(w.model)["val_loss"], 1e-6)
    load_model(w.model, tmp_path / "run" / "model.safetensors")
    assert eval_rows[-1]["val_loss"] == pytest.approx(w.evaluate(w.model)["val_loss"], 1e-6)


# ---------------------------------------------------------------- 10. schedule-free


class ScheduleFreeProbe(Callback):
    """At the end of fit (train mode): the iterate y, the sequence z and beta1 per parameter."""

    def on_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        opt = trainer.optimizer
        self.y, self.z, self.beta1 = {}, {}, {}
        names = {id(p): k for k, p in trainer.model.named_parameters()}
        for group in opt.param_groups:
            assert group["train_mode"]
            for p in group["params"]:
                self.y[names[id(p)]] = p.detach().clone()
                self.z[names[id(p)]] = opt.state[p]["z"].detach().clone()
                self.beta1[names[id(p)]] = group["betas"][0]


def test_schedule_free_saves_and_evaluates_the_averaged_weights(make_config, tmp_path) -> None:
    cfg = make_config(
        "digits",
        "optimizer.name=schedulefree-adamw",
        "optimizer.lr=0.003",
        "batch.size=32",
        "train.max_steps=10",
        "train.eval_every=5",
    )
    assert OPTIMIZERS[cfg.optimizer.name].schedule_free
    probe = ScheduleFreeProbe()
    cadence.train(cfg, run_dir=tmp_path / "run", callbacks=[probe])
    saved = load_file(tmp_path / "run" / "model.safetensors")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")

    # Schedule-free keeps y = (1 - beta1) z + beta1 x in the model; x is the average.
    averaged = {
        k: (y - (1 - probe.beta1[k]) * probe.z[k]) / probe.beta1[k] for k, y in probe.y.items()
    }
    assert_close(saved, averaged, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(saved[k], probe.y[k]) for k in saved)

    # The logged validation loss is that of the averaged (saved) weights, not of y.
    w = build_workload(cfg)
    load_model(w.model, tmp_path / "run" / "model.safetensors")
    on_saved = w.evaluate(w.model)["val_loss"]
    with torch.no_grad():
        for k, p in w.model.named_parameters():
            p.copy_(probe.y[k])
    on_y = w.evaluate(w.model)["val_loss"]
    assert rows[-1]["val_loss"] == pytest.approx(on_saved, rel=1e-6)
    assert abs(rows[-1]["val_loss"] - on_y) > 10 * abs(rows[-1]["val_loss"] - on_saved)


# ---------------------------------------------------------------- 11. precision and clipping


@torch.no_grad()
def fixed_slice_loss(w: Workload, n: int = 256) -> float:
    batch = w.batch(torch.arange(n))
    return float(w.loss_sum(w.model, batch)) / w.units(batch)


def test_bf16_autocast_trains(make_config) -> None:
    cfg = make_config(
        "mnist",
        "optimizer.name=adamw",
        "optimizer.lr=0.003",
        "batch.size=32",
        "train.max_steps=30",
        "train.eval_every=30",
        "train.precision=bf16",
    )
    w = build_workload(cfg)
    before = fixed_slice_loss(w)
    dtypes: set[torch.dtype] = set()
    first_linear = next(m for m in w.model.modules() if isinstance(m, torch.nn.Linear))
    handle = first_linear.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    summary, _, _ = run_fit(cfg, w)
    handle.remove()
    after = fixed_slice_loss(w)  # measured in float32

    assert torch.bfloat16 in dtypes  # the forward really ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in w.model.parameters())  # master weights
    assert math.isfinite(summary["final_train_loss"])
    assert after < 0.9 * before


@pytest.mark.parametrize("clip_ratio", [0.25, 4.0], ids=["clipped", "not-clipped"])
def test_clip_grad_norm_logs_the_pre_clip_norm_and_clips_the_update(
    make_config, clip_ratio: float
) -> None:
    lr, batch = 0.1, 32
    base = ["optimizer.name=sgd", f"optimizer.lr={lr}", f"batch.size={batch}", "train.max_steps=1"]
    w = build_workload(make_config("logreg", *base))
    idx = Trainer(make_config("logreg", *base), w).sampler.indices(0, batch).numpy()
    x, y = w.x_train.double().numpy(), w.y_train.double().numpy()
    theta0 = theta_of(w)
    g = logreg_grad(x[idx], y[idx], theta0, w.l2)
    norm = float(np.linalg.norm(g))
    clip = clip_ratio * norm

    cfg = make_config("logreg", *base, f"train.clip_grad_norm={num(clip)}")
    w = build_workload(cfg)
    assert np.array_equal(theta_of(w), theta0)  # same seed, same start
    _, rows, _ = run_fit(cfg, w)
    delta = theta_of(w) - theta0

    assert rows[0]["grad_norm"] == pytest.approx(norm, rel=1e-10)  # before clipping
    if clip < norm:
        assert float(np.linalg.norm(delta)) == pytest.approx(lr * clip, rel=1e-5)
        np.testing.assert_allclose(delta, -lr * clip * g / norm, rtol=1e-5, atol=1e-12)
    else:
        np.testing.assert_allclose(delta, -lr * g, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- 12. checkpoints


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


# ---------------------------------------------------------------- 13. budgets


@pytest.mark.parametrize(("workload", "budget"), [("logreg", "max_samples"), ("lm", "max_tokens")])
def test_sample_and_token_budgets_stop_at_the_right_step(
    make_config, workload: str, budget: str
) -> None:
    batch, limit = 8, 100
    if budget == "max_tokens":
        limit = 300  # tokens: a few steps of 8 sequences
    cfg = make_config(
        workload, "optimizer.name=sgd", f"batch.size={batch}", f"train.{budget}={limit}"
    )
    w = build_workload(cfg)
    per_step = batch * (w.tokens_per_sample if budget == "max_tokens" else 1)
    summary, _, _ = run_fit(cfg, w)
    expected_steps = math.ceil(limit / per_step)
    assert summary["stop_reason"] == budget
    assert summary["steps"] == expected_steps
    assert summary["samples"] == expected_steps * batch
    if budget == "max_tokens":
        assert summary["tokens"] == expected_steps * per_step
