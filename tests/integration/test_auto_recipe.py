"""``batch.size``, ``optimizer.lr`` and ``schedule.warmup`` set to ``auto`` (issue 32, part 3).

A pilot within ``batch.pilot`` of the budget measures the LR curve and the gradient noise
scale on the run's own model and data, the budget pays for it, the weights and random streams
come back as they were, the decisions land in config.yaml (so a resume never decides again),
auto.json and the summary; input that cannot work is one line and exit 2, with nothing written.
"""

from __future__ import annotations

import json
import math
import types
from typing import cast

import pytest
import torch
from trainer_helpers import TINY

import cadence
from cadence.cli import main
from cadence.config import parse_config
from cadence.tune.auto_recipe import MIN_STEPS, PEAK_DIVISOR, choose_auto, peak_lr
from cadence.tune.lr_finder import LRFindResult
from cadence.workloads import build_workload
from cli_helpers import as_sets

pytestmark = pytest.mark.usefixtures("plots_off")

SEQ = 16  # TINY["lm"]'s model.seq_len: tokens per sample
BUDGET = 3200 * SEQ  # tokens: 3,200 samples
AUTO = [
    "batch.size=auto",
    "optimizer.lr=auto",
    "schedule.warmup=auto",
    "optimizer.name=adamw",
    "optimizer.betas=[0.9, 0.95]",
    "schedule.name=wsd",
    f"train.max_tokens={BUDGET}",
    "train.max_steps=1",  # raised by the decision: the data budget is the run's
    "train.eval_every=100000",
    "train.log_every=1",
]


def test_an_auto_run_decides_pays_for_its_pilot_and_writes_it_down(make_config, tmp_path):
    run_dir = tmp_path / "run"
    summary = cadence.train(make_config("lm", *AUTO), run_dir=run_dir)
    record = json.loads((run_dir / "auto.json").read_text())
    decided, pilot = record["decided"], record["pilot"]
    size = decided["batch.size"]
    saved = parse_config(run_dir / "config.yaml")
    assert saved.batch.size == size and saved.optimizer.lr == decided["optimizer.lr"]
    assert saved.schedule.warmup == decided["schedule.warmup"]
    # the pilot stays within its share and the run's own budget is what it left
    assert 0 < pilot["samples"] <= 0.1 * BUDGET / SEQ and pilot["tokens"] == pilot["samples"] * SEQ
    assert saved.train.max_tokens == BUDGET - pilot["tokens"]
    steps = math.ceil(saved.train.max_tokens / (size * SEQ))
    assert summary["stop_reason"] == "max_tokens" and summary["steps"] == steps
    assert summary["tokens"] + pilot["tokens"] <= BUDGET + size * SEQ  # the last step's overshoot
    # the batch: at least the pilot's, few enough to leave MIN_STEPS steps of what is left
    assert 8 <= size <= (BUDGET / SEQ * 0.9) // MIN_STEPS
    # warmup: 2 / (1 - beta2) = 40 steps, at most a tenth of the run
    assert decided["schedule.warmup"] == min(40, steps // 10)
    assert record["cooldown_steps"] == round(0.2 * steps)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["batch_size"] for r in rows if "batch_size" in r} == {size}
    assert summary["auto"]["batch.size"] == size and summary["auto"]["pilot"] == pilot
    assert json.loads((run_dir / "summary.json").read_text())["auto"] == summary["auto"]
    assert (run_dir / "lr_find.json").is_file()
    # the peak LR of this annealed (WSD) run: two thirds of the LR at the loss minimum of the
    # range test at the chosen batch
    at_size = record["measured"]["lr_range_test_chosen_batch"]
    assert at_size["batch"] == size
    assert decided["optimizer.lr"] == at_size["min_loss_lr"] / PEAK_DIVISOR
    # whose ramp spans a decade either side of the small batch's loss-minimum LR
    small = record["measured"]["lr_range_test_small_batch"]["min_loss_lr"]
    ramp = json.loads((run_dir / "lr_find.json").read_text())["settings"]
    assert ramp["min_lr"] == pytest.approx(small / 10) and ramp["batch_size"] == size
    assert ramp["max_lr"] == pytest.approx(small * 10)
    # a resume reads config.yaml, where nothing is auto any more: nothing is decided again
    assert choose_auto(saved, None) == (saved, None)  # type: ignore[arg-type]


def test_the_peak_lr_is_near_the_edge_only_where_the_schedule_anneals(make_config) -> None:
    # a range test's result, as far as the rule reads it
    found = cast(LRFindResult, types.SimpleNamespace(suggestion=0.001, min_loss_lr=0.03))
    for name in ("cosine", "wsd", "linear"):
        lr, why = peak_lr(make_config("lm", f"schedule.name={name}"), found)
        assert lr == 0.03 / PEAK_DIVISOR and name in why
    for name in ("constant", "step"):
        assert peak_lr(make_config("lm", f"schedule.name={name}"), found)[0] == 0.001


def test_the_pilot_leaves_the_weights_and_random_streams_as_they_were(make_config):
    cfg = make_config(
        "digits", "batch.size=auto", "optimizer.lr=auto", "optimizer.name=sgd",
        "train.max_samples=20000",
    )  # fmt: skip
    workload = build_workload(cfg)
    before = {k: v.clone() for k, v in workload.model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    decided_cfg, record = choose_auto(cfg, workload, log=lambda _: None)
    assert torch.equal(torch.get_rng_state(), rng)
    after = workload.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # what the pilot spent is what its parts spent: range tests, warm steps, measurements
    m = record["measured"]
    small = m["lr_range_test_small_batch"]
    noise = m["noise_scale"]
    second = m.get("lr_range_test_chosen_batch", {"batch": 0, "steps": 0})
    spent = (
        small["batch"] * small["steps"]
        + noise["at_batch"] * noise["after_steps"]
        + 2 * noise["at_batch"] * noise["measurements"]
        + second["batch"] * second["steps"]
    )
    assert record["pilot"]["samples"] == spent <= 0.1 * 20000
    assert decided_cfg.train.max_samples == 20000 - spent
    assert isinstance(decided_cfg.batch.size, int) and decided_cfg.optimizer.lr > 0


def _cli(tmp_path, capsys, *sets: str) -> tuple[int, list[str]]:
    argv = ["train", *as_sets([*TINY["lm"], "train.progress=false", *sets])]
    capsys.readouterr()
    code = main([*argv, "--run-dir", str(tmp_path / "run")])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("sets", "start"),
    [
        (["batch.size=auto"], "batch.size: auto chooses the batch for a budget in data"),
        (["batch.size=auto", "optimizer.lr=auto", "train.max_tokens=25600"],
         "batch.size: auto needs a pilot of at least 3200 tokens"),
        (["batch.size=auto", "batch.micro_size=64", f"train.max_tokens={BUDGET}"],
         "batch.micro_size: auto: the budget (3200 samples) leaves fewer than 100 steps"),
        (["batch.size=auto", "schedule.warmup=500", "train.max_steps=100000",
          f"train.max_tokens={BUDGET}"],
         "train.max_tokens: the budget ends at step 400, before the warmup of 500 steps"),
        (["workload=logreg", "optimizer.name=gd", "batch.size=auto", "train.max_samples=9000"],
         "batch.size: auto measures the noise of mini-batch gradients, and optimizer 'gd'"),
        (["batch.size=auto", "batch.pilot=0.5", f"train.max_tokens={BUDGET}"], "batch.pilot: "),
        (["batch.size=auto", "batch.schedule=[[0.5, 64]]", f"train.max_tokens={BUDGET}"],
         "batch.schedule: batch.size: auto chooses one batch"),
    ],
)  # fmt: skip
@pytest.mark.usefixtures("tiny_lm_cached")
def test_auto_input_that_cannot_work_is_one_line_exit_2(tmp_path, capsys, sets, start):
    code, err = _cli(tmp_path, capsys, *sets)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"cadence: error: {start}"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["find-lr", "find-batch"])
def test_the_measuring_commands_ask_for_a_batch_instead_of_auto(tmp_path, capsys, command):
    argv = [command, *as_sets([*TINY["lm"], "batch.size=auto", f"train.max_tokens={BUDGET}"])]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1:]  # after "preparing ..." if any
    assert err == [
        f"cadence: error: batch.size: auto is decided by the pilot of `cadence train`; the "
        f"{'LR range test' if command == 'find-lr' else 'noise-scale measurement'} needs a "
        "batch size (--set batch.size=N)"
    ]
