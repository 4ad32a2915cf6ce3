"""Fault tolerance: damaged checkpoints, crashes mid-save, non-finite steps, a full disk, bad input.

Each fault must cost at most the work since the last good checkpoint, never earlier data, and
reach the user as one line (exit 2 for their input, 1 for a machine fault), not a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import pickle
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from resume_helpers import (
    TINY_LM,
    Crash,
    CrashAt,
    assert_same_run,
    checkpoint_steps,
    no_plots,
    rows,
    steps_of,
    tail_lines,
)
from safetensors.torch import load_file

import cadence
import cadence.training.checkpoint as ckpt
from cadence.cli import main
from cadence.config import ConfigError
from cadence.run import load_config, resume
from cli_helpers import as_sets, cli_env

pytestmark = pytest.mark.usefixtures("plots_off")


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


class MakesMarker:
    """Unpickling this creates `path`: proof that a file was (or was not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------- damaged checkpoints

STEPS, EVERY, CRASH = 8, 2, 7  # checkpoints at 2, 4, 6; the crash leaves step 7 unsaved


@pytest.fixture
def crashed_and_reference(make_config, tmp_path) -> tuple[Path, Path]:
    """A run that died at step 7 (checkpoints 2, 4, 6) and the same run uninterrupted."""
    cfg = make_config(
        "digits",
        "model.hidden=[16]",
        "optimizer.name=adamw",
        "batch.size=8",
        f"train.max_steps={STEPS}",
        f"train.checkpoint_every={EVERY}",
        "train.eval_every=4",
        "train.log_every=1",
    )
    cadence.train(cfg, run_dir=tmp_path / "reference")
    with pytest.raises(Crash):
        cadence.train(cfg, run_dir=tmp_path / "run", callbacks=[CrashAt(CRASH)])
    assert checkpoint_steps(tmp_path / "run") == [2, 4, 6]
    return tmp_path / "run", tmp_path / "reference"


def _truncate_weights(folder: Path, marker: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_trainer_byte(folder: Path, marker: Path) -> None:
    data = bytearray((folder / "trainer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "trainer.pt").write_bytes(bytes(data))


def _trainer_is_a_pickle(folder: Path, marker: Path) -> None:
    (folder / "trainer.pt").write_bytes(pickle.dumps(MakesMarker(marker)))


def _weights_are_a_torch_pickle(folder: Path, marker: Path) -> None:
    torch.save(
        {"fc.weight": torch.zeros(2), "x": MakesMarker(marker)}, folder / "model.safetensors"
    )


def _no_manifest(folder: Path, marker: Path) -> None:
    (folder / "checkpoint.json").unlink()


DAMAGE: dict[str, Callable[[Path, Path], None]] = {
    "truncated weights": _truncate_weights,
    "flipped byte in trainer.pt": _flip_trainer_byte,
    "trainer.pt is a pickle": _trainer_is_a_pickle,
    "weights are a torch pickle": _weights_are_a_torch_pickle,
    "missing checkpoint.json": _no_manifest,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    crashed_and_reference, tmp_path, capsys, damage
):
    run_dir, reference = crashed_and_reference
    marker = tmp_path / "unpickled"
    DAMAGE[damage](step_dir(run_dir, 6), marker)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 0
    out = capsys.readouterr()
    warnings = [line for line in tail_lines(out.out + out.err) if "warning" in line]
    assert len(warnings) == 1 and "step_00000006" in warnings[0], warnings
    assert not marker.exists()
    # Resumed from step 4, the run is still the uninterrupted one.
    assert_same_run(reference, run_dir, range(1, STEPS + 1))


def test_every_checkpoint_damaged_is_exit_2_and_nothing_rewritten(crashed_and_reference, capsys):
    run_dir, _ = crashed_and_reference
    for step in checkpoint_steps(run_dir):
        _truncate_weights(step_dir(run_dir, step), Path())
    before = (run_dir / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = [line for line in tail_lines(capsys.readouterr().err)]
    assert len(err) == 1 and "no valid checkpoint" in err[0], err
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_a_pickle_with_a_matching_checksum_is_still_never_unpickled(
    crashed_and_reference, tmp_path, capsys
):
    run_dir, _ = crashed_and_reference
    marker = tmp_path / "unpickled"
    folder = step_dir(run_dir, 6)
    _trainer_is_a_pickle(folder, marker)
    manifest = json.loads((folder / "checkpoint.json").read_text())
    manifest["files"]["trainer.pt"] = hashlib.sha256(
        (folder / "trainer.pt").read_bytes()
    ).hexdigest()
    (folder / "checkpoint.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    code = main(["train", "--resume", str(run_dir)])
    err = tail_lines(capsys.readouterr().err)
    assert not marker.exists()
    assert code == 2 and len(err) == 1 and "trainer.pt" in err[0], err


def test_torn_last_metrics_line_does_not_block_resume(crashed_and_reference):
    run_dir, reference = crashed_and_reference
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 8, "samp')  # the process died inside a write
    resume(run_dir)
    assert_same_run(reference, run_dir, range(1, STEPS + 1))


# ---------------------------------------------------------------- crashes while saving


def _partial_then(exc: BaseException, on_call: int):
    """A save_model that writes half a file and then fails, on its `on_call`-th call."""
    real, calls = ckpt.save_model, []

    def save_model(model, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) < on_call:
            return real(model, filename, *args, **kwargs)
        Path(filename).write_bytes(b"\0" * 100)
        raise exc

    return save_model


def test_crash_mid_save_leaves_the_previous_checkpoint_and_no_temporaries(
    make_config, tmp_path, monkeypatch
):
    cfg = make_config(
        "logreg", "optimizer.name=sgd", "train.max_steps=8", "train.checkpoint_every=2"
    )
    reference = tmp_path / "reference"
    cadence.train(cfg, run_dir=reference)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(ckpt, "save_model", _partial_then(Crash("mid-save"), on_call=2))
    with pytest.raises(Crash):
        cadence.train(cfg, run_dir=run_dir)
    monkeypatch.undo()
    no_plots(monkeypatch)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000002"]
    ckpt.verify(step_dir(run_dir, 2))
    # A SIGKILL mid-save leaves its temporary folder behind: it is not a checkpoint.
    leftover = run_dir / "checkpoints" / ".step_00000004.tmp-999999"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 10)
    resume(run_dir)
    assert rows(run_dir) == rows(reference)
    assert (run_dir / "model.safetensors").read_bytes() == (
        reference / "model.safetensors"
    ).read_bytes()


@pytest.mark.usefixtures("tiny_lm_cached")
def test_disk_full_during_a_save_is_one_line_exit_1_and_earlier_checkpoints_load(
    tmp_path, monkeypatch, capsys
):
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt, "save_model", _partial_then(full, on_call=3))
    run_dir = tmp_path / "run"
    argv = [
        "train", *as_sets(TINY_LM), *as_sets(["train.max_steps=8", "train.checkpoint_every=2"]),
        "--run-dir", str(run_dir),
    ]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 1
    err = tail_lines(capsys.readouterr().err)
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert checkpoint_steps(run_dir) == [2, 4]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    no_plots(monkeypatch)
    for step in (2, 4):
        state = ckpt.load_checkpoint(step_dir(run_dir, step))
        assert state["train_state"]["step"] == step
        load_file(step_dir(run_dir, step) / "model.safetensors")
    assert main(["train", "--resume", str(run_dir)]) == 0  # space freed: the run goes on
    assert steps_of(run_dir)[-1] == 8


@pytest.mark.usefixtures("tiny_lm_cached")
def test_safetensors_write_error_reaches_the_user_as_an_os_error(tmp_path, monkeypatch, capsys):
    """safetensors reports a failed write as its own SafetensorError, not OSError."""
    from safetensors import SafetensorError

    def failing_save_file(*args, **kwargs):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr("safetensors.torch.save_file", failing_save_file)
    argv = ["train", *as_sets(TINY_LM), "--set", "train.max_steps=3"]
    capsys.readouterr()
    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 1
    err = tail_lines(capsys.readouterr().err)
    assert len(err) == 1 and "No space left on device" in err[0], err


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))


def test_a_real_failed_write_through_the_cli_is_one_line_exit_1(tmp_path):
    """No monkeypatching: the kernel refuses the checkpoint's largest file (RLIMIT_FSIZE)."""
    run_dir = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "cadence", "train", *as_sets(TINY_LM)]
        + [*as_sets(["train.max_steps=3", "train.log_every=1"]), "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=240,
        env=cli_env(),
        preexec_fn=_limit_file_size,
    )
    assert res.returncode == 1, res.stderr
    err = tail_lines(res.stderr)
    assert len(err) == 1 and "File too large" in err[0], res.stderr
    assert not list((run_dir / "checkpoints").iterdir())  # nothing half-written left


# ---------------------------------------------------------------- non-finite steps


def nan_on_training_call(monkeypatch: pytest.MonkeyPatch, calls: set[int]) -> None:
    """Make the workload's training loss NaN on the given (1-based) training-mode calls."""
    import cadence.run.session as run

    real_build = run.build_workload

    def build_workload(*args, **kwargs):
        workload = real_build(*args, **kwargs)
        real_loss, count = workload.loss_sum, [0]

        def loss_sum(model, batch):
            loss = real_loss(model, batch)
            if model.training:
                count[0] += 1
                if count[0] in calls:
                    return loss * float("nan")
            return loss

        workload.loss_sum = loss_sum
        return workload

    monkeypatch.setattr(run, "build_workload", build_workload)


LOGREG = [
    "schedule.name=constant",
    "schedule.warmup=0",
    "workload=logreg",
    "optimizer.name=sgd",
    "optimizer.lr=0.1",
    "batch.size=16",
]
LOGREG += [
    "train.clip_grad_norm=null",
    "train.log_every=1",
    "train.progress=false",
    "train.max_steps=10",
]


def test_nonfinite_stop_checkpoints_the_last_good_state_and_exits_1(tmp_path, monkeypatch, capsys):
    bad = 6
    nan_on_training_call(monkeypatch, {bad})
    run_dir = tmp_path / "run"
    capsys.readouterr()
    code = main(
        ["train", *as_sets([*LOGREG, "train.on_nonfinite=stop"]), "--run-dir", str(run_dir)]
    )
    err = tail_lines(capsys.readouterr().err)
    assert code == 1 and len(err) == 1 and f"step {bad}" in err[0], err
    assert checkpoint_steps(run_dir) == [bad - 1]
    state = ckpt.load_checkpoint(step_dir(run_dir, bad - 1))
    assert state["train_state"]["step"] == bad - 1
    weights = load_file(step_dir(run_dir, bad - 1) / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert steps_of(run_dir) == list(range(1, bad))


def test_nonfinite_skip_drops_the_update_and_counts_it(tmp_path, monkeypatch, capsys):
    bad, steps, size = 4, 10, 16
    nan_on_training_call(monkeypatch, {bad})
    run_dir = tmp_path / "run"
    assert (
        main(["train", *as_sets([*LOGREG, "train.on_nonfinite=skip"]), "--run-dir", str(run_dir)])
        == 0
    )
    got = rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert all(r.get("skipped_steps", 0) == (1 if r["step"] >= bad else 0) for r in got)
    # The dropped batch is consumed: the data order of the run is unchanged after it.
    assert got[-1]["samples"] == (steps + 1) * size
    assert all(math.isfinite(r["train_loss"]) for r in got)


def test_nonfinite_rollback_rewinds_lowers_lr_and_keeps_steps_unique(tmp_path, monkeypatch, capsys):
    bad, steps, every, factor, lr = 8, 10, 3, 0.25, 0.1
    nan_on_training_call(monkeypatch, {bad})
    run_dir = tmp_path / "run"
    overrides = [
        *LOGREG,
        "train.on_nonfinite=rollback",
        f"train.checkpoint_every={every}",
        f"train.rollback_lr_factor={factor}",
    ]
    assert main(["train", *as_sets(overrides), "--run-dir", str(run_dir)]) == 0
    got = rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # none twice after the rewind
    back_to = (bad - 1) // every * every
    for r in got:
        rewound = r["step"] > back_to
        assert r["lr"] == pytest.approx(lr * (factor if rewound else 1.0), rel=1e-12), r
        assert r.get("rollbacks", 0) == (1 if rewound else 0)
        assert r.get("skipped_steps", 0) == (1 if rewound else 0)


# ---------------------------------------------------------------- bad input never costs data


@pytest.mark.usefixtures("tiny_lm_cached")
@pytest.mark.parametrize(
    "extra, key",
    [
        (["--set", "optimizer.lr=-1"], "optimizer.lr"),
        (["--set", "data.path=/no/such/corpus"], "data.path"),
        (["--run-dir", "{file}/run"], "--run-dir"),
    ],
)
def test_bad_input_is_exit_2_one_line_nothing_created(tmp_path, capsys, extra, key):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    extra = [x.replace("{file}", str(a_file)) for x in extra]
    if "--run-dir" not in extra:
        extra += ["--run-dir", str(tmp_path / "run")]
    capsys.readouterr()
    assert main(["train", *as_sets(TINY_LM), "--set", "train.max_steps=3", *extra]) == 2
    err = tail_lines(capsys.readouterr().err)
    assert len(err) == 1 and key in err[0], err
    assert not (tmp_path / "run").exists()
    assert a_file.read_text() == "not a directory\n"


def test_a_bad_resume_leaves_the_run_untouched(crashed_and_reference, capsys):
    run_dir, _ = crashed_and_reference
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--set", "optimizer.lr=-1"]) == 2
    assert len(tail_lines(capsys.readouterr().err)) == 1
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- any --set text

KEYS = [
    "workload", "optimizer.name", "optimizer.lr", "optimizer.momentum", "optimizer.nesterov",
    "optimizer.betas", "schedule.name", "schedule.warmup", "schedule.milestones",
    "schedule.decay_fraction", "plateau.patience", "plateau.enabled", "batch.size",
    "batch.micro_size", "batch.schedule", "train.max_steps", "train.checkpoint_every",
    "train.keep_checkpoints", "train.on_nonfinite", "train.rollback_lr_factor", "train.precision",
    "model.hidden", "data.path", "train", "optimizer", "nope.key", "train.nope",
]  # fmt: skip
VALUES = st.one_of(
    st.sampled_from(
        [
            "0",
            "-1",
            "1e9",
            "nan",
            "inf",
            "full",
            "true",
            "null",
            "[]",
            "[[0.5, 8]]",
            "{a: 1}",
            "rollback",
            "skip",
            "sgd",
            "wsd",
            "[1, 2]",
            "'",
            "[",
            "x: [",
            "~",
        ]
    ),
    st.text(max_size=12),
)
OVERRIDE = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), VALUES),
    st.text(max_size=20),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OVERRIDE, max_size=4))
def test_any_override_text_is_a_config_or_a_config_error(overrides):
    try:
        load_config(None, overrides)
    except ConfigError as exc:
        # One line always: echoed user text has its line breaks escaped.
        assert len(str(exc).splitlines()) == 1, str(exc)
