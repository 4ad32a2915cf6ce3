"""Which weights are saved and evaluated: the EMA, the schedule-free average, bf16 master weights.

The EMA and the schedule-free average are checked against references computed alongside the run,
and each logged validation loss against the weights saved for it; under bf16 autocast the master
weights stay float32 and the model still trains.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, load_model
from torch.testing import assert_close
from trainer_helpers import params_of, run_fit

import cadence
from cadence.optim import OPTIMIZERS
from cadence.track.metrics import read_metrics
from cadence.training import Callback
from cadence.workloads import Workload, build_workload

# ---------------------------------------------------------------- EMA


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


# ---------------------------------------------------------------- schedule-free


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


# ---------------------------------------------------------------- precision


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
