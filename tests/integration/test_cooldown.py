"""`cadence cooldown`: a branch off a stable-phase checkpoint is the run its config describes.

Reference: the same config trained from scratch (bitwise-equal weights and metrics rows). The
source run's files are hashed before and after: a branch only reads them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from resume_helpers import assert_same_run

import cadence
from cadence.cli import main
from cadence.run.branch import cooldown, plan_cooldown
from cadence.track.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("plots_off")

# A WSD run of 120 steps (stable until 120 - round(0.2 * 115) = 97) with a momentum warmup
# written as a run fraction, so the branch must pin it to the source's steps (0.3 * 120 = 36).
SOURCE = [
    "optimizer.name=sgd",
    "optimizer.lr=0.05",
    "schedule.name=wsd",
    "schedule.warmup=5",
    "schedule.cooldown=1-sqrt",
    "schedule.momentum=[[0, 0.5], [0.3, 0.9]]",
    "train.max_steps=120",
    "train.checkpoint_every=20",
    "train.keep_checkpoints=10",
    "train.eval_every=10",
    "train.log_every=5",
]


def digest(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, empty_yaml: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("cooldown") / "stable"
    cfg = cadence.load_config(
        empty_yaml, ["workload=digits", "model.hidden=[32]", "train.progress=false", *SOURCE]
    )
    cadence.train(cfg, run_dir=run_dir, plots=False)
    return run_dir


def test_a_branch_is_the_run_its_config_trains_from_scratch(make_config, source, tmp_path):
    before = digest(source)
    summary = cooldown(source, 20, at=80, run_dir=tmp_path / "branch", plots=False)
    assert summary["steps"] == 100
    straight = make_config(
        "digits",
        *SOURCE,
        "train.max_steps=100",
        "schedule.decay_steps=20",
        "schedule.momentum=[[0, 0.5], [36, 0.9]]",
    )
    cadence.train(straight, run_dir=tmp_path / "straight", plots=False)
    logged = range(5, 101, 5)
    assert_same_run(tmp_path / "straight", tmp_path / "branch", logged)
    assert digest(source) == before
    rows = read_metrics(tmp_path / "branch" / "metrics.jsonl")
    lrs = {r["step"]: r["lr"] for r in rows}
    assert lrs[80] == 0.05 and lrs[100] < lrs[90] < 0.05  # stable until 80, then cooling


def test_the_default_checkpoint_is_the_newest_of_the_stable_phase(source):
    cfg, checkpoint, step = plan_cooldown(source, 50)
    assert step == 80  # 100 and 120 are inside the source's own cooldown (from step 97)
    assert checkpoint.name == "step_00000080"
    assert cfg.train.max_steps == 130 and cfg.schedule.decay_steps == 50
    assert cfg.schedule.cooldown == "1-sqrt"  # the source's shape unless --shape says otherwise
    assert plan_cooldown(source, 50, shape="linear")[0].schedule.cooldown == "linear"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "10", "--at", "100"], "past the start of"),
        (["--steps", "10", "--at", "30"], "no checkpoint at that step (saved: 20, 40"),
        (["--steps", "0"], "--steps: the cooldown needs a positive number"),
    ],
)
def test_bad_branches_are_one_line_errors_that_write_nothing(
    source, tmp_path, capsys, args, message
):
    out = tmp_path / "branch"
    assert main(["cooldown", str(source), *args, "--run-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cadence: error: ") and message in err and "\n" not in err
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_a_run_without_a_flat_lr_or_a_taken_directory_is_refused(
    make_config, source, tmp_path, capsys
):
    cosine = tmp_path / "cosine"
    cfg = make_config(
        "digits", "schedule.name=cosine", "train.max_steps=4", "train.checkpoint_every=2"
    )
    cadence.train(cfg, run_dir=cosine, plots=False)
    assert main(["cooldown", str(cosine), "--steps", "5"]) == 2
    assert "schedule.name=cosine, whose LR is not flat" in capsys.readouterr().err
    assert main(["cooldown", str(source), "--steps", "5", "--run-dir", str(cosine)]) == 2
    assert "already exists" in capsys.readouterr().err
