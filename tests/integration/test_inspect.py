"""Issue 34: per-layer health, loss-spike defence and sharpness in real runs.

The per-layer statistics are checked against a hand computation from the weights before and
after a step; the spike policies against a run whose data holds one corrupted batch at a known
step, and a rollback against a run configured from the start to skip the same window.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from resume_helpers import TINY_LM, assert_same_run, crash_then_resume, rows, weights

import cadence
from browser import CHROMIUM, colours, render
from cadence.runtime.distributed import SINGLE
from cadence.training import Callback
from cadence.training.batches import global_batch
from cadence.workloads import build_workload
from cli_helpers import run_forked

pytestmark = pytest.mark.usefixtures("plots_off")

SPIKE_STEP = 30  # the step whose batch is corrupted
BATCH = 16


class ByHand(Callback):
    """Recomputes each inspected step's statistics from the weights around it."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.checked = 0

    def on_start(self, trainer: Any) -> None:
        self.before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}

    def on_step(self, trainer: Any) -> None:
        record, model = trainer.inspection, trainer.model
        after = {k: v.detach().clone() for k, v in model.named_parameters()}
        assert record is not None and record["step"] == trainer.state.step
        size = trainer.batch_size()
        start = trainer.state.samples - size
        micro, _ = global_batch(trainer.workload, trainer.sampler, SINGLE, start, size, None)
        x = micro[0][0]
        h = torch.nn.functional.linear(x, self.before["net.0.weight"], self.before["net.0.bias"])
        out = torch.nn.functional.linear(
            h.relu(), self.before["net.2.weight"], self.before["net.2.bias"]
        )
        for layer, act in (("net.0", h), ("net.2", out)):
            names = [f"{layer}.weight", f"{layer}.bias"]
            w = math.sqrt(sum(float(self.before[n].pow(2).sum()) for n in names))
            du = math.sqrt(sum(float((after[n] - self.before[n]).pow(2).sum()) for n in names))
            params = dict(model.named_parameters())
            g = math.sqrt(sum(float(params[n].grad.pow(2).sum()) for n in names))
            got = record["layers"][layer]
            assert got["weight_norm"] == pytest.approx(w, rel=1e-5)
            assert got["update_ratio"] == pytest.approx(du / w, rel=1e-4)
            assert got["grad_norm"] == pytest.approx(g, rel=1e-5)
            assert got["act_rms"] == pytest.approx(float(act.pow(2).mean().sqrt()), rel=1e-5)
        self.before = after
        self.checked += 1


def test_per_layer_health_equals_a_hand_computation(make_config, tmp_path):
    cfg = make_config(
        "digits",
        "model.hidden=[8]",
        "optimizer.name=sgd",
        "optimizer.lr=0.05",
        "optimizer.momentum=0.9",
        f"batch.size={BATCH}",
        "train.max_steps=4",
        "train.inspect_every=1",
    )
    hand = ByHand()
    had_tf = "tensorflow" in sys.modules
    cadence.train(cfg, run_dir=tmp_path / "run", callbacks=[hand])
    assert hand.checked == 4
    # TensorBoard's writer would import an installed TensorFlow into the training process
    assert had_tf or "tensorflow" not in sys.modules
    records = [json.loads(line) for line in (tmp_path / "run" / "inspect.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert set(records[0]["layers"]) == {"net.0", "net.2"}
    # TensorBoard has the same numbers, and their spread over the layers as histograms
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    logged = events.Scalars("layers/update_ratio/net.0")
    want = [r["layers"]["net.0"]["update_ratio"] for r in records]
    assert [e.step for e in logged] == [1, 2, 3, 4]
    assert [e.value for e in logged] == pytest.approx(want, rel=1e-6)
    assert "layers/grad_norm" in events.Tags()["histograms"]


def test_inspection_and_sharpness_leave_the_run_bitwise_unchanged(make_config, tmp_path):
    """Measuring reads only: no RNG draw, no change to a step (dropout draws every step)."""
    base = [*TINY_LM, "model.n_layer=2", "model.dropout=0.1", "train.max_steps=6"]
    plain = make_config("lm", *base)
    watched = make_config(
        "lm", *base, "train.inspect_every=2", "train.sharpness_every=3", "train.on_spike=warn"
    )
    cadence.train(plain, run_dir=tmp_path / "plain")
    summary = cadence.train(watched, run_dir=tmp_path / "watched")
    assert weights(tmp_path / "plain") == weights(tmp_path / "watched")
    assert summary["spikes"] == []
    measured = [r for r in rows(tmp_path / "watched") if "sharpness" in r]
    assert [r["step"] for r in measured] == [3, 6]
    assert all(math.isfinite(r["sharpness"]) and r["sharpness_threshold"] > 0 for r in measured)
    record = json.loads((tmp_path / "watched" / "inspect.jsonl").read_text().splitlines()[-1])
    ceiling = math.log(16)  # a causal row over at most 16 positions
    entropies = [s["attn_entropy"] for s in record["layers"].values() if "attn_entropy" in s]
    assert len(entropies) == 2 and all(0 < e < ceiling for e in entropies)


def corrupted_digits(cfg: cadence.Config) -> Any:
    """The digits workload with the samples of step SPIKE_STEP's batch scaled 100x and their
    labels moved by one: finite, and far outside anything the model has seen."""
    workload = build_workload(cfg)
    position = (SPIKE_STEP - 1) * BATCH
    idx = workload.sampler(cfg.train.seed, shuffle=True).indices(position, BATCH)
    workload.x_train[idx] *= 100.0
    workload.y_train[idx] = (workload.y_train[idx] + 1) % 10
    return workload


SPIKE_RUN = [
    "model.hidden=[16]",
    "optimizer.name=sgd",
    "optimizer.lr=0.05",
    "optimizer.momentum=0.9",
    f"batch.size={BATCH}",
    "train.max_steps=40",
    "train.checkpoint_every=10",
    "train.log_every=1",
    "train.clip_grad_norm=1.0",  # a kept spike (warn) does not wreck the weights
]


def spike_config(make_config, *extra: str) -> cadence.Config:
    return make_config("digits", *SPIKE_RUN, *extra)


@pytest.mark.parametrize("policy", ["warn", "skip"])
def test_a_corrupted_batch_is_caught_at_its_step(make_config, tmp_path, policy, capfd):
    cfg = spike_config(make_config, f"train.on_spike={policy}", "train.inspect_every=5")
    summary = cadence.train(cfg, run_dir=tmp_path / "run", workload=corrupted_digits(cfg))
    event = summary["spikes"][0]
    assert event["step"] == SPIKE_STEP and event["z"] > cfg.train.spike_z
    assert event["action"] == policy and event["layer"] in {"net.0", "net.2"}
    assert f"step {SPIKE_STEP}: loss spike" in capfd.readouterr().err
    assert summary["steps"] == 40
    assert any(r.get("spike_step") == SPIKE_STEP for r in rows(tmp_path / "run"))


def test_rollback_continues_as_a_run_told_to_skip_that_window(make_config, tmp_path):
    """The spike comes before step 30's checkpoint, so the rollback goes to step 20's and skips
    samples [20 * BATCH, SPIKE_STEP * BATCH), the spike's batch included; with the LR kept
    (factor 1), a run configured with that window from the start trains bit for bit alike."""
    rolled = spike_config(make_config, "train.on_spike=rollback", "train.rollback_lr_factor=1.0")
    summary = cadence.train(rolled, run_dir=tmp_path / "rolled", workload=corrupted_digits(rolled))
    (event,) = summary["spikes"]
    window = [20 * BATCH, SPIKE_STEP * BATCH]
    assert event["step"] == SPIKE_STEP and event["rolled_back_to"] == 20
    assert event["skipped"] == window
    told = spike_config(make_config, f"train.skip_samples=[{window}]")
    cadence.train(told, run_dir=tmp_path / "told", workload=corrupted_digits(told))
    assert weights(tmp_path / "rolled") == weights(tmp_path / "told")
    steps = [r["step"] for r in rows(tmp_path / "rolled")]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # rows past step 20 were rewound


def test_resume_is_exact_with_inspection_spikes_and_sharpness_on(make_config, tmp_path):
    cfg = spike_config(
        make_config,
        "train.on_spike=skip",
        "train.inspect_every=4",
        "train.sharpness_every=5",
        "train.max_steps=36",
    )
    cadence.train(cfg, run_dir=tmp_path / "straight", workload=corrupted_digits(cfg))
    from unittest import mock

    with mock.patch("cadence.run.session._workload", lambda c, *a, **k: corrupted_digits(c)):
        crash_then_resume(cfg, tmp_path / "crashed", 33)
    assert_same_run(tmp_path / "straight", tmp_path / "crashed", range(1, 37))
    straight = (tmp_path / "straight" / "inspect.jsonl").read_text()
    assert (tmp_path / "crashed" / "inspect.jsonl").read_text() == straight


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("train.inspect_every=0", "train.inspect_every: must be >= 1"),
        ("train.on_spike=rollback", "train.on_spike: rollback needs train.checkpoint_every"),
        ("train.skip_samples=[[10, 5]]", "train.skip_samples: each window is [start, end)"),
    ],
)
def test_bad_inspection_settings_are_one_line_exit_2(tmp_path, override, says):
    done = run_forked(
        "train", "--set", "workload=digits", "--set", override, "--run-dir", str(tmp_path / "r")
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], done.stderr
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def spiked_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A rolled-back spike, with per-layer health and sharpness, then `cadence inspect`."""
    from cadence.cli.main import main

    root = tmp_path_factory.mktemp("inspect")
    overrides = [
        "workload=digits",
        "train.progress=false",
        *SPIKE_RUN,
        "train.on_spike=rollback",
        "train.inspect_every=2",
        "train.sharpness_every=10",
    ]
    cfg = cadence.load_config(None, overrides)
    summary = cadence.train(cfg, run_dir=root / "run", workload=corrupted_digits(cfg), plots=False)
    assert main(["inspect", str(root / "run")]) == 0
    return root / "run", summary


def test_inspect_tells_the_spike_its_step_and_layer(spiked_run, capsys):
    from cadence.run.account import RunRecords, account

    run, summary = spiked_run
    (event,) = summary["spikes"]
    lines = account(RunRecords.read(run))
    (told,) = [line for line in lines if "loss spike" in line]
    assert told.startswith(f"Step {SPIKE_STEP}: loss spike") and event["layer"] in told
    assert "rolled back to step 20, skipped samples 320-480" in told
    assert any("Update ratios" in line for line in lines)
    assert any("stability threshold" in line for line in lines)
    page = (run / "inspect.html").read_text()
    assert told.replace("'", "&#x27;") in page and "<script" not in page
    pngs = {p.name for p in (run / "inspect").glob("*.png")}
    assert pngs == {"loss.png", "lr.png", "update_ratio.png", "depth.png", "sharpness.png"}


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed")
def test_inspect_page_renders_in_headless_chromium(spiked_run, tmp_path):
    dom, shot = render(spiked_run[0] / "inspect.html", tmp_path, size="1200,3000")
    assert 'data-loaded-images="5"' in dom, dom[:500]
    assert f"Step {SPIKE_STEP}: loss spike" in dom
    assert colours(shot) > 50


def test_inspect_of_a_folder_without_a_run_is_one_line_exit_2(tmp_path):
    done = run_forked("inspect", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "holds no metrics.jsonl" in done.stderr
    assert not (tmp_path / "inspect.html").exists()


def test_a_resume_may_turn_inspection_on_and_skip_data(make_config, tmp_path):
    """What a user does after seeing a spike: resume with the window skipped, watching."""
    from cadence.run import resume

    cfg = spike_config(make_config, "train.max_steps=10")
    cadence.train(cfg, run_dir=tmp_path / "run")
    window = [10 * BATCH, 20 * BATCH]  # the next ten batches
    extra = ["train.max_steps=12", "train.inspect_every=1", f"train.skip_samples=[{window}]"]
    summary = resume(tmp_path / "run", overrides=extra)
    assert summary["samples"] == 20 * BATCH + 2 * BATCH
    records = (tmp_path / "run" / "inspect.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in records] == [11, 12]
