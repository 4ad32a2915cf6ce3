"""Which weights are saved and evaluated: the EMA, the schedule-free average, bf16 master weights.

The EMA and the schedule-free average are checked against references computed alongside the run,
and each logged validation loss against the weights saved for it; under bf16 autocast the master
weights stay float32 and the model still trains.
"""

from __future__ import annotations

import json
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


# ---------------------------------------------------------------- LAWA


class Snapshots(Callback):
    """The weights after every step, in float64: the LAWA reference averages the right ones."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_step(self, trainer: Any) -> None:
        self.at[trainer.state.step] = {
            k: v.detach().double().clone() for k, v in trainer.model.named_parameters()
        }


def test_lawa_is_the_mean_of_the_latest_k_snapshots_saved_and_evaluated(make_config, tmp_path):
    k, every, steps = 3, 4, 22
    cfg = make_config(
        "digits", "optimizer.name=sgd", "optimizer.lr=0.1", "optimizer.momentum=0.9",
        f"train.max_steps={steps}", "train.eval_every=11", f"train.lawa={k}",
        f"train.lawa_every={every}",
    )  # fmt: skip
    snaps = Snapshots()
    cadence.train(cfg, run_dir=tmp_path / "run", callbacks=[snaps])
    lawa = load_file(tmp_path / "run" / "model_lawa.safetensors")
    taken = [s for s in range(every, steps + 1, every)][-k:]  # steps 12, 16, 20
    assert taken == [12, 16, 20]
    want = {n: sum(snaps.at[s][n] for s in taken) / k for n in lawa}
    assert_close(lawa, {n: v.float() for n, v in want.items()}, rtol=1e-6, atol=1e-7)

    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in rows] == [11, 22] and all("lawa_val_loss" in r for r in rows)
    w = build_workload(cfg)
    load_model(w.model, tmp_path / "run" / "model_lawa.safetensors")
    assert rows[-1]["lawa_val_loss"] == pytest.approx(w.evaluate(w.model)["val_loss"], 1e-6)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_metrics"]["val_loss"] == rows[-1]["val_loss"]  # the live weights'
    # export --lawa ships the average
    from cadence.deploy.export import export_run

    out = export_run(tmp_path / "run", "safetensors", tmp_path / "out", lawa=True).out
    assert_close(load_file(out / "model.safetensors"), lawa, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["train.lawa=0"], "train.lawa: the number of snapshots"),
        (["train.lawa=3", "train.distributed=fsdp"], "train.lawa: its snapshots are whole"),
        (["train.lawa=3", "train.lawa_every=0.001"], "train.lawa_every: 0.001 is less than"),
    ],
)
def test_bad_lawa_settings_are_one_line_naming_the_key(make_config, sets, message) -> None:
    with pytest.raises(cadence.ConfigError, match="^" + message):
        make_config("digits", "train.max_steps=100", *sets)


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


def test_lawa_and_the_noise_scale_monitor_run_side_by_side(make_config, tmp_path) -> None:
    cfg = make_config(
        "digits", "optimizer.name=sgd", "optimizer.lr=0.1", "train.max_steps=8",
        "train.eval_every=4", "train.lawa=2", "train.lawa_every=2", "train.log_noise_scale=true",
    )  # fmt: skip
    cadence.train(cfg, run_dir=tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert all("lawa_val_loss" in r and "noise_scale" in r for r in rows), rows
