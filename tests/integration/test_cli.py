"""The CLI as a user runs it: a child process, exit codes, one-line errors, the run directory.

The child is forked from this process (cli_helpers.ForkedCLI: `cadence.cli.main` as
`python -m cadence` calls it, without a fresh interpreter's seconds of imports); the tests of
the entry point itself (a first run, a bad value, `--help`) start `python -m cadence` for real.
The bad-input table goes through `main` in process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_helpers import run_forked

TINY_LM = [
    "--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
    "--set", "model.seq_len=16", "--set", "data.max_bytes=100000", "--set", "train.max_steps=6",
    "--set", "train.eval_every=3", "--set", "train.log_every=2", "--set", "train.eval_samples=8",
    "--set", "batch.size=4", "--set", "schedule.warmup=1", "--set", "train.threads=1",
]  # fmt: skip


def cadence(*args: str, real: bool = False) -> subprocess.CompletedProcess[str]:
    """`cadence ARGS` in a forked child, or with `real`, `python -m cadence ARGS`."""
    if not real:
        return run_forked(*args, timeout=300)
    return subprocess.run(
        [sys.executable, "-m", "cadence", *args], capture_output=True, text=True, timeout=300
    )


def test_train_leaves_a_complete_run_directory(tmp_path):
    run = tmp_path / "run"
    res = cadence("train", *TINY_LM, "--run-dir", str(run), real=True)
    assert res.returncode == 0, res.stderr
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "tokenizer.json").is_file()
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["loss.png", "lr.png"]
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4, 6]
    required = {
        "step",
        "samples",
        "tokens",
        "lr",
        "batch_size",
        "train_loss",
        "grad_norm",
        "time_s",
    }
    assert all(required <= set(r) for r in rows)
    assert "val_loss" in rows[1] and "val_loss" in rows[-1] and "val_loss" not in rows[0]
    assert rows[-1]["tokens"] == 6 * 4 * 16
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["stop_reason"] == "max_steps"
    assert summary["params"] > 0 and summary["target_step"] is None
    # The resolved config reproduces the run's settings.
    res = cadence("train", str(run / "config.yaml"), "--run-dir", str(tmp_path / "again"))
    assert res.returncode == 0, res.stderr
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["final_train_loss"] == summary["final_train_loss"]


@pytest.mark.parametrize(
    "args, key",
    [
        (["--set", "optimizer.lr=-1"], "optimizer.lr"),
        (["--set", "optimizer.name=adamx"], "optimizer.name"),
        (["--set", "schedule.name=nope"], "schedule.name"),
        (["--set", "bogus.key=1"], "bogus"),
        (["--set", "batch.size=abc"], "batch.size"),
        (["--set", "data.path=/no/such/dir"], "data.path"),
        (["--set", "optimizer.lr"], "--set"),
        (["no-such-recipe"], "no-such-recipe"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, args, key, capsys):
    # In process (main is what `python -m cadence` runs; starting torch 8 times costs ~30 s);
    # the real process's exit code and stderr are the next test's.
    from cadence.cli import main

    run = tmp_path / "run"
    code = main(["train", *args, "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in err
    assert not run.exists()


def test_a_bad_value_exits_2_with_one_line_from_the_real_process(tmp_path):
    run = tmp_path / "run"
    res = cadence("train", "--set", "optimizer.lr=-1", "--run-dir", str(run), real=True)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "optimizer.lr" in lines[0] and "Traceback" not in res.stderr
    assert not run.exists()


def test_existing_run_directory_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    res = cadence("train", *TINY_LM, "--run-dir", str(run))
    assert res.returncode == 2 and "already holds a run" in res.stderr
    assert (run / "metrics.jsonl").read_text() == "{}\n"


def test_list_names_every_registry_entry():
    from cadence.config import recipe_names
    from cadence.models.gpt import PARAMETRIZATIONS
    from cadence.optim import OPTIMIZERS
    from cadence.schedules import SCHEDULES
    from cadence.workloads import WORKLOADS

    res = cadence("list")
    assert res.returncode == 0
    for name in [*OPTIMIZERS, *SCHEDULES, *WORKLOADS, *recipe_names(), *PARAMETRIZATIONS]:
        assert name in res.stdout, name


def test_list_keys_names_every_config_key_with_its_meaning():
    import dataclasses

    from cadence.config import Config
    from cadence.config.keys import config_keys

    rows = config_keys()
    assert all(meaning for _, _, meaning in rows), [k for k, _, m in rows if not m]
    keys = {k for k, _, _ in rows}
    for section in dataclasses.fields(Config):
        default = getattr(Config(), section.name)
        names = (
            [f.name for f in dataclasses.fields(default)]
            if dataclasses.is_dataclass(default)
            else []
        )
        for name in names:
            assert any(
                k == f"{section.name}.{name}" or k.startswith(f"{section.name}.{name}.")
                for k in keys
            )
    res = cadence("list", "keys")
    assert res.returncode == 0
    lines = res.stdout.splitlines()  # a pipe: rich's 80 columns
    missing = [k for k in keys if not any(f" {k} " in line for line in lines)]
    assert not missing, missing  # every key whole on a line, never cut short
    flat = " ".join(res.stdout.split())
    for key in ("privacy.target_epsilon", "privacy.max_epsilon", "batch.size", "model.peft.r"):
        assert key in flat, key
    assert "DP-SGD (Opacus)" in flat


def test_help_lists_commands():
    res = cadence("--help", real=True)
    assert res.returncode == 0 and "train" in res.stdout and "list" in res.stdout
    res = cadence("train", "--help")
    assert "--set" in res.stdout and "--run-dir" in res.stdout


def test_a_smoke_run_of_the_default_recipe_just_works(tmp_path):
    """`--set train.max_steps=N` on the default recipe: its warmup is a fraction of the run."""
    i = TINY_LM.index("schedule.warmup=1")
    tiny = TINY_LM[: i - 1] + TINY_LM[i + 1 :]  # the recipe's own warmup: 0.1 of the run
    res = cadence("train", *tiny, "--set", "train.max_steps=2", "--run-dir", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 2


def test_a_clamped_warmup_is_one_warning_line_and_the_run_goes_on(tmp_path):
    cfg = tmp_path / "logreg.yaml"
    cfg.write_text(
        "workload: logreg\noptimizer: {name: sgd, lr: 0.1}\n"
        "schedule: {name: cosine, warmup: 30}\ntrain: {max_steps: 300, progress: false}\n"
    )
    res = cadence("train", str(cfg), "--set", "train.max_steps=4", "--run-dir", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("cadence: warning: schedule.warmup: 30 ")
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert "warmup: 3\n" in saved  # the run records the warmup it used
