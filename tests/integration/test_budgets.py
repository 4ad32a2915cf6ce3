"""The budget the user gives is the schedules' horizon (issue 32, part 2).

The same run given its budget as steps, samples or tokens follows the same LR at every step and
stops at the same step; a time budget moves the schedules when it runs ahead of the steps (a
fake clock makes that deterministic); a budget that cannot be a horizon is one line and exit 2
before anything is written; the run names its horizon in its first line and in summary.json.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import torch
from resume_helpers import WALL_FIELDS, Crash, CrashAt, assert_same_run, crash_then_resume, rows
from trainer_helpers import TINY, run_fit

import cadence
from cadence.cli import main
from cadence.run import resume
from cadence.runtime.distributed import World
from cadence.schedules import build_schedule
from cadence.training import Callback, read_step
from cadence.training import step as step_module
from cli_helpers import as_sets

pytestmark = pytest.mark.usefixtures("plots_off")

FAR = "train.max_steps=100000"  # a step budget raised out of the way
LOGGED = ["train.log_every=1", "train.eval_every=1000", "schedule.name=cosine"]


def _same(*runs: tuple[dict, list[dict], Any]) -> None:
    """Every run logged the same rows (LR, loss, batch, counts) and stopped at the same step."""
    (first, ref, _), *rest = runs
    cut = [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in ref]
    for summary, got, _ in rest:
        assert [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in got] == cut
        assert summary["steps"] == first["steps"] == summary["horizon_steps"]


def test_a_language_model_budget_as_steps_tokens_or_samples_is_one_run(make_config):
    base = ["batch.size=4", "schedule.warmup=0.2", *LOGGED]
    tokens = 10 * 4 * 16  # 10 steps of 4 sequences of model.seq_len = 16 tokens
    runs = [
        run_fit(make_config("lm", *base, "train.max_steps=10")),
        run_fit(make_config("lm", *base, FAR, f"train.max_tokens={tokens}")),
        run_fit(make_config("lm", *base, FAR, f"train.max_tokens={tokens - 50}")),  # mid-step
        run_fit(make_config("lm", *base, FAR, "train.max_samples=40")),
    ]
    _same(*runs)
    assert [s["horizon_budget"] for s, _, _ in runs] == [
        "train.max_steps", "train.max_tokens", "train.max_tokens", "train.max_samples",
    ]  # fmt: skip
    assert [s["stop_reason"] for s, _, _ in runs] == [
        "max_steps", "max_tokens", "max_tokens", "max_samples",
    ]  # fmt: skip
    lrs = [r["lr"] for r in runs[1][1]]
    assert lrs[1] == max(lrs) and lrs[-1] < 0.05 * max(lrs)  # warmed up, then decayed to the end


def test_a_classifier_budget_as_steps_or_samples_is_one_run(make_config):
    base = ["batch.size=8", "schedule.warmup=0.3", "optimizer.name=sgd", *LOGGED]
    _same(
        run_fit(make_config("digits", *base, "train.max_steps=7")),
        run_fit(make_config("digits", *base, FAR, "train.max_samples=56")),
        run_fit(make_config("digits", *base, FAR, "train.max_samples=50")),
    )


def test_a_staged_batch_ramp_budget_as_steps_tokens_or_samples_is_one_run(make_config):
    # 4 sequences for the first half of a 10-step run, 8 for the second: 60 samples, 960 tokens
    base = ["batch.size=4", "batch.schedule=[[0.5, 8]]", "schedule.warmup=0.2", *LOGGED]
    runs = [
        run_fit(make_config("lm", *base, "train.max_steps=10")),
        run_fit(make_config("lm", *base, FAR, "train.max_samples=60")),
        run_fit(make_config("lm", *base, FAR, "train.max_samples=55")),
        run_fit(make_config("lm", *base, FAR, "train.max_tokens=960")),
    ]
    _same(*runs)
    assert [r["batch_size"] for r in runs[0][1]] == [4] * 5 + [8] * 5


class FakeTime:
    """What cadence.training.state reads the wall clock through: seconds the test decides."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def process_time(self) -> float:
        return time.process_time()


class Tick(Callback):
    """Each completed step takes one second of the fake clock."""

    def __init__(self, clock: FakeTime) -> None:
        self.clock = clock

    def on_step(self, trainer: Any) -> None:
        self.clock.now += 1.0


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    clock = FakeTime()
    monkeypatch.setattr("cadence.training.state.time", clock)
    return clock


def _fit_timed(cfg: cadence.Config, clock: FakeTime) -> tuple[dict, list[dict]]:
    from cadence.training import Trainer, fit
    from cadence.workloads import build_workload

    rows_: list[dict] = []

    class Keep(Callback):
        def on_log(self, trainer: Any, row: dict[str, Any]) -> None:
            rows_.append(row)

    summary = fit(Trainer(cfg, build_workload(cfg), [Tick(clock), Keep()]))
    return summary, rows_


def test_a_time_budget_that_ends_first_drives_the_schedule(make_config, fake_time):
    """10 s of a 1000-step WSD run at 1 s a step: the cooldown starts at half the time budget."""
    cfg = make_config(
        "digits", "batch.size=8", "train.log_every=1", "train.eval_every=1000",
        "schedule.name=wsd", "schedule.decay_fraction=0.5", "optimizer.lr=0.01",
        "train.max_steps=1000", "train.max_time_s=10",
    )  # fmt: skip
    summary, got = _fit_timed(cfg, fake_time)
    assert summary["stop_reason"] == "max_time" and summary["steps"] == 11
    wsd = build_schedule("wsd", total_steps=1000, decay_fraction=0.5)
    # Step k reads the time every process agreed at step k - 1: k - 2 seconds (one a step).
    position = [0] + [max(k - 1, min(1000, (k - 2) * 100)) for k in range(2, 12)]
    assert [r["lr"] for r in got] == [0.01 * wsd(p) for p in position]
    # the cooldown starts at step 7, 5 s into the 10 (its first step is still at the peak)
    assert got[6]["lr"] == 0.01 > got[7]["lr"]


def test_a_time_budget_that_does_not_end_first_changes_nothing(make_config, fake_time):
    base = ["batch.size=8", "schedule.warmup=0.3", "train.max_steps=8", *LOGGED]
    plain = run_fit(make_config("digits", *base))
    summary, timed = _fit_timed(make_config("digits", *base, "train.max_time_s=1000"), fake_time)
    _same(plain, (summary, timed, None))


def test_the_elapsed_time_rides_in_the_step_read_and_is_agreed(monkeypatch):
    """Under torch.distributed the schedules follow the mean of the ranks' clocks, taken in the
    step's one all-reduce, so every rank sets the same LR."""
    calls = []

    def all_reduce(tensor, op=None):
        calls.append(tensor.clone())
        tensor.add_(torch.tensor([0.75, 0.0, 0.0, 13.0], dtype=tensor.dtype))  # the other rank

    monkeypatch.setattr(step_module.dist, "all_reduce", all_reduce)
    world = World(rank=0, size=2, mode="ddp")
    read = read_step(torch.tensor(1.25), torch.tensor(3.0), world, elapsed_s=11.0)
    assert len(calls) == 1 and calls[0].tolist() == [1.25, 0.0, 0.0, 11.0]
    assert (read.loss, read.elapsed_s, read.grad_norm) == (1.0, 12.0, 3.0)


def _cli(tmp_path, capsys, *sets: str) -> tuple[int, list[str], list[str]]:
    argv = ["train", *as_sets([*TINY["lm"], "train.progress=false", *sets])]
    capsys.readouterr()
    code = main([*argv, "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr()
    return code, out.out.strip().splitlines(), out.err.strip().splitlines()


def test_the_run_names_its_horizon_first_and_in_the_summary(tmp_path, capsys):
    code, out, err = _cli(
        tmp_path, capsys, "batch.size=4", FAR, "train.max_tokens=640", "train.eval_every=100",
        "schedule.name=multistep", "schedule.milestones=[5, 12]",
    )  # fmt: skip
    assert code == 0
    lines = [line for line in out if line.startswith("cadence: horizon:")]
    assert lines == [
        "cadence: horizon: step 10 (train.max_tokens=640 ends first; train.max_steps=100000 "
        "would end later)"
    ]
    # the milestone past the horizon is the run's one warning
    assert [line for line in err if "warning" in line] == [
        "cadence: warning: schedule.milestones: [12] at or past the horizon (step 10, "
        "train.max_tokens); the LR never decays there"
    ]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["horizon_steps"], summary["horizon_budget"]) == (10, "train.max_tokens")
    assert summary["steps"] == 10


@pytest.mark.parametrize(
    ("sets", "start"),
    [
        (["train.max_tokens=640", "schedule.warmup=100", "batch.size=4"],
         "train.max_tokens: the budget ends at step 10, before the warmup of 100 steps"),
        (["workload=digits", "train.max_tokens=640"],
         "train.max_tokens: workload 'digits' trains on samples without tokens"),
        (["train.max_samples=64", "batch.schedule=auto"],
         "train.max_samples: batch.schedule: auto decides the batch as the run goes"),
        # Only the workload knows its training set: this one fails when it is built, still
        # before the run directory is made.
        (["workload=logreg", "optimizer.name=gd", "batch.size=full", "train.max_samples=1000",
          "schedule.warmup=5"],
         "train.max_samples: the budget ends at step 3, before the warmup of 5 steps"),
    ],
)  # fmt: skip
def test_a_budget_that_cannot_be_the_horizon_is_one_line_exit_2(tmp_path, capsys, sets, start):
    code, _, err = _cli(tmp_path, capsys, FAR, *sets)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"cadence: error: {start}"), err
    assert not (tmp_path / "run").exists()


def test_resume_of_a_token_budget_run_continues_the_same_lr(make_config, tmp_path):
    cfg = make_config(
        "lm", "batch.size=4", FAR, f"train.max_tokens={8 * 4 * 16}", "schedule.name=cosine",
        "schedule.warmup=0.25", "train.log_every=1", "train.eval_every=4",
        "train.checkpoint_every=2",
    )  # fmt: skip
    cadence.train(cfg, run_dir=tmp_path / "reference")
    crash_then_resume(cfg, tmp_path / "crashed", 5)
    assert_same_run(tmp_path / "reference", tmp_path / "crashed", range(1, 9))
    lrs = [r["lr"] for r in rows(tmp_path / "crashed")]
    assert lrs[1] == max(lrs) > lrs[-1]  # laid out over 8 steps, not 100000


def test_resume_of_a_time_budget_run_continues_its_clock(make_config, tmp_path, fake_time):
    """The agreed elapsed time is checkpointed: a resumed run reads the schedules where the
    crashed one left them and spends what was left of its time budget, not a new one."""
    cfg = make_config(
        "digits", "batch.size=8", "train.log_every=1", "train.eval_every=1000",
        "schedule.name=wsd", "schedule.decay_fraction=0.5", "train.max_steps=1000",
        "train.max_time_s=10", "train.checkpoint_every=2",
    )  # fmt: skip
    cadence.train(cfg, run_dir=tmp_path / "reference", callbacks=[Tick(fake_time)])
    fake_time.now = 0.0
    with pytest.raises(Crash):
        cadence.train(cfg, run_dir=tmp_path / "crashed", callbacks=[Tick(fake_time), CrashAt(7)])
    fake_time.now = 1000.0  # the restart took a while: only the run's own time counts
    resume(tmp_path / "crashed", callbacks=[Tick(fake_time)])
    assert_same_run(tmp_path / "reference", tmp_path / "crashed", range(1, 12))
    lrs = [r["lr"] for r in rows(tmp_path / "crashed")]
    assert lrs[6] == max(lrs) > lrs[7]  # the cooldown starts 5 s in, across the restart
