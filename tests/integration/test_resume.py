"""Exact resume: an interrupted-and-resumed run is the uninterrupted run, bit for bit.

In process, a crash is a callback that raises after a metrics row is written; through the CLI it
is SIGKILL, SIGTERM or SIGINT sent to `python -m cadence train`. Either way the resumed run must
end with the same model.safetensors bytes and the same metrics.jsonl rows (wall-time fields
aside), each step exactly once.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path

import pytest
from resume_helpers import (
    DIGITS_CONTROLLED,
    TINY_LM,
    assert_same_run,
    checkpoint_steps,
    crash_then_resume,
    rows,
    run_cli,
    start_cli,
    steps_of,
    tail_lines,
    train_reference,
    wait_for_step,
    weights,
)

import cadence
from cadence.cli import main
from cadence.run import resume
from cadence.runtime.events import Callback
from cadence.schedules import build_schedule
from cli_helpers import as_sets

pytestmark = pytest.mark.usefixtures("plots_off")


# ---------------------------------------------------------------- 1. in-process lockstep

FAMILIES = {
    "sgd": ["optimizer.name=sgd", "optimizer.lr=0.05"],
    "sgd+momentum": ["optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9"],
    "adamw": ["optimizer.name=adamw", "optimizer.lr=0.01", "optimizer.weight_decay=0.1"],
    "muon": ["optimizer.name=muon", "optimizer.lr=0.02", "optimizer.momentum=0.9"],
    # momentum and weight decay as functions of the step, live across the crash point
    "muon, scheduled momentum and decay": [
        "optimizer.name=muon",
        "optimizer.lr=0.02",
        "optimizer.weight_decay=0.1",
        "schedule.momentum=[[0, 0.8], [0.5, 0.95], [1.0, 0.85]]",
        "schedule.weight_decay=[[0, 1.0], [1.0, 0.2]]",
    ],
    # LAWA's snapshots come back from the checkpoint: the rows' lawa_val_loss depend on them
    "adamw, LAWA readout": [
        "optimizer.name=adamw",
        "optimizer.lr=0.01",
        "train.lawa=3",
        "train.lawa_every=2",
    ],
    "lion": ["optimizer.name=lion", "optimizer.lr=0.001"],
    "schedulefree-adamw": ["optimizer.name=schedulefree-adamw", "optimizer.lr=0.01"],
    "schedulefree-sgd": ["optimizer.name=schedulefree-sgd", "optimizer.lr=0.05"],
    # from packages: their state (Prodigy's d, SOAP's eigenbases, Kron's preconditioners and
    # NumPy-drawn update schedule) must come back whole
    "prodigy": ["optimizer.name=prodigy", "optimizer.lr=1.0"],
    "dadapt-adam": ["optimizer.name=dadapt-adam", "optimizer.lr=1.0"],
    "soap": ["optimizer.name=soap", "optimizer.lr=0.003"],
    "psgd-kron": ["optimizer.name=psgd-kron", "optimizer.lr=0.001"],
    "ademamix": ["optimizer.name=ademamix", "optimizer.lr=0.003"],
    "mars": ["optimizer.name=mars", "optimizer.lr=0.003"],
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_crash_and_resume_is_bitwise_the_uninterrupted_run(make_config, tmp_path, family):
    steps, every = 12, 3
    crash_step = random.Random(family).randrange(every + 1, steps)  # past the first checkpoint
    cfg = make_config(
        "digits",
        *DIGITS_CONTROLLED,
        *FAMILIES[family],
        "schedule.name=cosine",
        f"train.max_steps={steps}",
        f"train.checkpoint_every={every}",
        "train.eval_every=2",
        "train.log_every=1",
    )
    cadence.train(cfg, run_dir=tmp_path / "straight")
    crash_then_resume(cfg, tmp_path / "crashed", crash_step)

    assert_same_run(tmp_path / "straight", tmp_path / "crashed", range(1, steps + 1))
    ref = rows(tmp_path / "straight")
    # The controllers were live across the crash point, or the test proves nothing about them.
    assert {r["batch_size"] for r in ref} == {4, 8}
    assert min(r["plateau_scale"] for r in ref) < 1.0
    assert any(r["plateau_scale"] < 1.0 for r in ref if r["step"] > crash_step)


def test_resume_with_ema_and_micro_batches_is_exact(make_config, tmp_path):
    steps, every = 10, 4
    cfg = make_config(
        "lm",
        *TINY_LM,
        "batch.micro_size=2",
        "train.ema=0.9",
        "model.dropout=0.1",  # draws from the torch RNG every step
        f"train.max_steps={steps}",
        f"train.checkpoint_every={every}",
        "train.eval_every=5",
        "train.log_every=1",
    )
    cadence.train(cfg, run_dir=tmp_path / "straight")
    crash_then_resume(cfg, tmp_path / "crashed", 7)
    assert_same_run(tmp_path / "straight", tmp_path / "crashed", range(1, steps + 1))
    ema = "model_ema.safetensors"
    assert (tmp_path / "straight" / ema).read_bytes() == (tmp_path / "crashed" / ema).read_bytes()


# ---------------------------------------------------------------- 2-3. the real CLI, killed

CLI_STEPS, CLI_EVERY = 40, 4
CLI_RUN = [
    *TINY_LM,
    "schedule.name=cosine",
    f"train.max_steps={CLI_STEPS}",
    f"train.checkpoint_every={CLI_EVERY}",
    "train.eval_every=10",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, trained in process from the same recipe + overrides as the CLI."""
    return train_reference(CLI_RUN, tmp_path_factory.mktemp("reference") / "run")


def test_sigkill_at_random_steps_then_resume_matches(cli_reference, tmp_path):
    rng = random.Random(20240531)
    run_dir = tmp_path / "run"
    args = ["train", *as_sets(CLI_RUN), "--run-dir", str(run_dir)]
    reached = 0
    for kill in range(2):  # killed, resumed and killed again, then resumed to the end
        target = reached + rng.randint(2, 10)
        proc = start_cli(*args)
        reached = wait_for_step(proc, run_dir / "metrics.jsonl", target)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"kill {kill} at {reached}: run had ended"
        args = ["train", "--resume", str(run_dir)]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert_same_run(cli_reference, run_dir, range(1, CLI_STEPS + 1))
    # A kill that landed mid-save may leave a temporary folder; it is never taken for a checkpoint.
    assert all(p.name.startswith("step_") for p in (run_dir / "checkpoints").glob("step_*"))


def test_sigterm_and_sigint_checkpoint_exit_with_hint_and_resume_exactly(cli_reference, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", *as_sets(CLI_RUN), "--run-dir", str(run_dir)]
    for sig, code, at in ((signal.SIGTERM, 143, 6), (signal.SIGINT, 130, 21)):
        proc = start_cli(*args)
        wait_for_step(proc, run_dir / "metrics.jsonl", at)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == code, err
        reached = steps_of(run_dir)[-1]  # the step boundary at which it stopped
        assert reached < CLI_STEPS
        assert checkpoint_steps(run_dir)[-1] == reached
        lines = tail_lines(err)
        assert len(lines) == 1 and f"--resume {run_dir}" in lines[0], err
        assert f"step {reached}" in lines[0] and sig.name in lines[0]
        args = ["train", "--resume", str(run_dir)]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert_same_run(cli_reference, run_dir, range(1, CLI_STEPS + 1))


class SignalSelf(Callback):
    def __init__(self, step: int, times: int) -> None:
        self.step, self.times = step, times

    def on_log(self, trainer, row) -> None:
        if row["step"] == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


def test_first_sigint_stops_at_the_step_boundary_second_exits_at_once(make_config, tmp_path):
    # What the handler was before: Python's default_int_handler, or SIG_IGN where the test run
    # itself was started in the background by a shell without job control (`cmd &`).
    before = signal.getsignal(signal.SIGINT)
    cfg = make_config("logreg", "optimizer.name=sgd", "train.max_steps=20", "train.log_every=1")
    # Sent while step 5 is being logged (after its boundary check): step 6 is the next boundary.
    summary = cadence.train(cfg, run_dir=tmp_path / "once", callbacks=[SignalSelf(5, 1)])
    assert summary["stop_reason"] == "interrupted (SIGINT)" and summary["steps"] == 6
    assert checkpoint_steps(tmp_path / "once") == [6]
    with pytest.raises(KeyboardInterrupt):
        cadence.train(cfg, run_dir=tmp_path / "twice", callbacks=[SignalSelf(5, 2)])
    assert steps_of(tmp_path / "twice")[-1] == 5  # not one more step
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


# ---------------------------------------------------------------- 4. extending a finished run


def test_extending_a_finished_wsd_run_moves_the_cooldown_to_the_new_end(make_config, tmp_path):
    first, total, lr = 10, 16, 0.1
    base = [
        "optimizer.name=sgd",
        f"optimizer.lr={lr}",
        "schedule.name=wsd",
        "schedule.decay_fraction=0.5",
        "schedule.warmup=2",
        "train.log_every=1",
    ]
    run_dir = tmp_path / "run"
    cadence.train(make_config("logreg", *base, f"train.max_steps={first}"), run_dir=run_dir)
    resume(run_dir, overrides=[f"train.max_steps={total}"])

    old = build_schedule("wsd", total_steps=first, warmup=2, decay_fraction=0.5)
    new = build_schedule("wsd", total_steps=total, warmup=2, decay_fraction=0.5)
    got = rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, total + 1))
    # `lr` is the rate the step used: step s ran at schedule(s - 1).
    for r in got:
        sched = old if r["step"] <= first else new
        assert r["lr"] == pytest.approx(lr * sched(r["step"] - 1), rel=1e-12), r["step"]
    assert got[-1]["lr"] < got[first]["lr"]  # the decay happens at the new end, not the old


def test_resuming_a_finished_run_without_a_larger_budget_trains_nothing(make_config, tmp_path):
    cfg = make_config("logreg", "optimizer.name=sgd", "train.max_steps=5", "train.log_every=1")
    run_dir = tmp_path / "run"
    cadence.train(cfg, run_dir=run_dir)
    before = weights(run_dir)
    summary = resume(run_dir)
    assert summary["steps"] == 5
    assert steps_of(run_dir) == [1, 2, 3, 4, 5]
    assert weights(run_dir) == before


# ---------------------------------------------------------------- 5-6. refused resumes


@pytest.fixture
def finished_run(make_config, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    cfg = make_config("logreg", "optimizer.name=sgd", "train.max_steps=4", "train.log_every=1")
    cadence.train(cfg, run_dir=run_dir)
    return run_dir


def test_resume_with_a_changed_config_is_refused_naming_the_keys(finished_run, capsys):
    capsys.readouterr()
    before = (finished_run / "metrics.jsonl").read_bytes()
    argv = ["train", "--resume", str(finished_run), "--set", "optimizer.lr=0.5"]
    assert main([*argv, "--set", "train.seed=3"]) == 2
    err = tail_lines(capsys.readouterr().err)
    assert len(err) == 1 and "optimizer.lr" in err[0] and "train.seed" in err[0], err
    assert (finished_run / "metrics.jsonl").read_bytes() == before  # nothing touched


def test_resume_accepts_budget_and_cadence_changes(finished_run, capsys):
    allowed = [
        "train.max_steps=6",
        "train.eval_every=3",
        "train.log_every=2",
        "train.checkpoint_every=5",
        "train.keep_checkpoints=2",
        "train.progress=false",
        "train.threads=1",
    ]
    assert main(["train", "--resume", str(finished_run), *as_sets(allowed)]) == 0
    assert steps_of(finished_run)[-1] == 6


@pytest.mark.parametrize("damage", ["no-checkpoints", "no-config", "empty", "missing"])
def test_resume_of_a_dir_without_a_run_is_a_clean_exit_2(finished_run, tmp_path, capsys, damage):
    target = finished_run
    if damage == "no-checkpoints":
        shutil.rmtree(finished_run / "checkpoints")
    elif damage == "no-config":
        (finished_run / "config.yaml").unlink()
    elif damage == "empty":
        target = tmp_path / "empty"
        target.mkdir()
    else:
        target = tmp_path / "missing"
    capsys.readouterr()
    assert main(["train", "--resume", str(target)]) == 2
    err = tail_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(target) in err[0], err


def test_resume_keeps_the_batch_that_auto_batch_chose(make_config, tmp_path):
    """batch.schedule: auto decides from measurements, so its decisions (and the noise
    estimator behind them) must come back from the checkpoint, with more made after it."""
    steps, every, crash = 24, 4, 19
    cfg = make_config(
        "digits",
        "model.hidden=[32,32]",
        "optimizer.name=sgd",
        "optimizer.lr=0.05",
        "batch.size=4",
        "batch.schedule=auto",
        "batch.max_size=64",
        "train.noise_scale_every=2",
        f"train.max_steps={steps}",
        f"train.checkpoint_every={every}",
        "train.eval_every=4",
        "train.log_every=1",
    )
    cadence.train(cfg, run_dir=tmp_path / "straight")
    crash_then_resume(cfg, tmp_path / "crashed", crash)
    assert_same_run(tmp_path / "straight", tmp_path / "crashed", range(1, steps + 1))
    sizes = [r["batch_size"] for r in rows(tmp_path / "straight")]
    # it grew before the checkpoint the resume starts from (step 16), and after the crash
    assert sizes[16 - 1] > 4 and sizes[-1] > sizes[crash - 1], sizes
