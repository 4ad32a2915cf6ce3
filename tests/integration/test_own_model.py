"""Your own model: a user's module, dataset and loss trained through cadence.

The module lives in a temporary folder, as it would in a user's project: `cadence train` finds
it through ``workload: mymodel:build`` from that folder, resumes it exactly after SIGKILL and
runs it on two processes; from Python, `cadence.train(cfg, workload=...)` takes the workload
object itself.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from resume_helpers import assert_same_run, wait_for_step
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

import cadence
from cli_helpers import ForkedCLI, as_sets, cadence_cmd, cli_env, run_forked

USER_MODULE = textwrap.dedent(
    '''
    """A user's project: a model, a dataset and a loss, nothing of cadence but the wrapper."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import Dataset

    import cadence


    class Blobs(Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.y = torch.randint(0, 3, (n,), generator=g)
            centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
            self.x = centres[self.y] + 0.5 * torch.randn(n, 2, generator=g)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], self.y[i]


    class Net(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 3))

        def forward(self, x):
            return self.body(x)


    def build(cfg):
        return cadence.DatasetWorkload(
            Net(cfg.model.hidden[0]), Blobs(512, 0), Blobs(128, 1), F.cross_entropy,
            metric="val_accuracy",
        )


    def wrong(cfg):
        return "not a workload"


    def broken(cfg):
        raise RuntimeError("the data is not there")
    '''
)

RUN = [
    "workload=mymodel:build",
    "model.hidden=[16]",
    "optimizer.name=sgd",
    "optimizer.lr=0.2",
    "optimizer.momentum=0.9",
    "batch.size=16",
    "train.max_steps=30",
    "train.eval_every=10",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "train.threads=1",
    "train.progress=false",
]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "mymodel.py").write_text(USER_MODULE)
    return tmp_path


def cli(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`cadence ARGS` run from the project folder, forked from this process (ForkedCLI: no
    fresh interpreter's imports; `python -m`'s sys.path). The user module is imported in the
    child only, so every test's `mymodel` is its own."""
    return run_forked(*args, timeout=timeout, cwd=project)


def real_cli(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m cadence ARGS` in a fresh interpreter, started in the project folder."""
    return subprocess.run(
        cadence_cmd(*args), capture_output=True, text=True, cwd=project, env=cli_env(),
        timeout=timeout,
    )  # fmt: skip


def test_a_user_module_trains_through_the_cli(project):
    res = real_cli(project, "train", *as_sets(RUN), "--run-dir", "run")
    assert res.returncode == 0, res.stderr
    summary = json.loads((project / "run" / "summary.json").read_text())
    assert summary["workload"] == "mymodel:build" and summary["metric"] == "val_accuracy"
    assert summary["steps"] == 30 and summary["samples"] == 30 * 16
    # Blobs 4 apart with noise 0.5: a linear boundary errs with probability ~1e-4 per sample.
    assert summary["best_metric"] > 0.95
    rows = [json.loads(x) for x in (project / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    weights = load_file(project / "run" / "model.safetensors")
    assert set(weights) == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"}


@pytest.mark.parametrize(
    "path, needle",
    [
        ("nosuchmodule:build", "cannot import 'nosuchmodule'"),
        ("mymodel:missing", "has no function 'missing'"),
        ("mymodel:wrong", "returned str, not a workload"),
        ("mymodel:broken", "raised RuntimeError: the data is not there"),
        ("my model:build", "not an import path"),
    ],
)
def test_a_bad_workload_path_is_one_line_naming_workload(
    project, path, needle, monkeypatch, capsys
):
    # In process (the CLI's main, as `python -m cadence` calls it): the exit code and the one
    # line are main's; test_a_user_module_trains_through_the_cli covers the real process.
    from cadence.cli import main

    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.delitem(sys.modules, "mymodel", raising=False)
    code = main(["train", "--set", f"workload={path}", "--run-dir", "run"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("cadence: error: workload: "), lines
    assert needle in lines[0]
    assert not (project / "run").exists()
    sys.modules.pop("mymodel", None)


def test_sigkill_then_resume_is_the_uninterrupted_run(project):
    assert cli(project, "train", *as_sets(RUN), "--run-dir", "straight").returncode == 0
    rng = random.Random(7)
    args = ["train", *as_sets(RUN), "--run-dir", "run"]
    reached = 0
    for _ in range(2):
        target = reached + rng.randint(4, 9)
        proc = ForkedCLI(*args, cwd=project)
        reached = wait_for_step(proc, project / "run" / "metrics.jsonl", target)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        args = ["train", "--resume", "run"]
    res = cli(project, *args)
    assert res.returncode == 0, res.stderr
    assert_same_run(project / "straight", project / "run", range(1, 31))


def test_two_processes_train_the_same_run_as_one(project):
    one = cli(project, "train", *as_sets(RUN), "--run-dir", "one")
    two = cli(project, "train", *as_sets(RUN), "--nproc", "2", "--run-dir", "two")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    s1, s2 = (json.loads((project / d / "summary.json").read_text()) for d in ("one", "two"))
    assert (s2["world_size"], s2["steps"], s2["samples"]) == (2, s1["steps"], s1["samples"])
    # The same global batches in the same order; only the order of float additions differs.
    assert s2["final_train_loss"] == pytest.approx(s1["final_train_loss"], rel=1e-4)
    w1, w2 = (load_file(project / d / "model.safetensors") for d in ("one", "two"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- from Python


class Squares(Dataset):
    """y = x^2 on [-1, 1], a regression the MLP below fits in a few dozen steps."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.x[i] ** 2


def squares() -> cadence.DatasetWorkload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    return cadence.DatasetWorkload(model, Squares(256, 0), Squares(64, 1), F.mse_loss, target=1e-9)


def test_cadence_train_takes_a_workload_object_and_resume_continues_it(tmp_path, empty_yaml):
    overrides = ["optimizer.name=adamw", "optimizer.lr=0.03", "batch.size=16"]
    overrides += ["train.eval_every=5", "train.log_every=5", "train.progress=false"]
    cfg = cadence.load_config(empty_yaml, [*overrides, "train.max_steps=20"])
    straight = cadence.train(cfg, run_dir=tmp_path / "straight", workload=squares(), plots=False)
    assert straight["workload"] == "custom" and straight["metric"] == "val_loss"
    assert straight["target"] == 1e-9 and straight["target_step"] is None  # the workload's own
    fresh = squares()
    assert straight["best_val_loss"] < fresh.evaluate(fresh.model)["val_loss"]  # it learned

    short = cadence.load_config(empty_yaml, [*overrides, "train.max_steps=10"])
    cadence.train(short, run_dir=tmp_path / "run", workload=squares(), plots=False)
    resumed = cadence.resume(
        tmp_path / "run", overrides=["train.max_steps=20"], workload=squares(), plots=False
    )
    assert resumed["steps"] == 20
    assert_same_run(tmp_path / "straight", tmp_path / "run", range(5, 21, 5))
    with pytest.raises(cadence.ConfigError, match="^workload: expected a cadence.Workload"):
        cadence.train(cfg, run_dir=tmp_path / "bad", workload=nn.Linear(1, 1))


def test_find_lr_and_compare_take_the_user_module(project):
    res = cli(project, "find-lr", "--set", "workload=mymodel:build", "--set", "model.hidden=[16]",
              "--steps", "20", "--out", "lr")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads((project / "lr" / "lr_find.json").read_text())["suggestion"] > 0
    (project / "spec.yaml").write_text(
        "name: mine\nseeds: 1\n"
        "defaults: {train.eval_every: 5, train.log_every: 5, model.hidden: [16]}\n"
        "workloads:\n  blobs: {workload: 'mymodel:build', target: 0.9, max_steps: 40}\n"
        "strategies:\n"
        "  sgd: {set: {optimizer.name: sgd, optimizer.lr: 0.2, batch.size: 16}}\n"
        "  adamw: {set: {optimizer.name: adamw, optimizer.lr: 0.01, batch.size: 16}}\n"
    )
    # a fresh interpreter: compare's pool starts its fork server from the project folder, as a
    # user's would (a fork of this process would find the server an earlier test started)
    res = real_cli(project, "compare", "spec.yaml", "--out", "cmp")
    assert res.returncode == 0, res.stdout + res.stderr
    results = json.loads((project / "cmp" / "results.json").read_text())
    rows = [r for r in results["table"] if r["workload"] == "blobs"]
    assert {r["strategy"] for r in rows} == {"sgd", "adamw"}
    assert all(r["metric"] == "val_accuracy" and r["higher_is_better"] for r in rows)


def test_export_of_a_user_model_is_refused_in_one_line(project):
    assert (
        cli(project, "train", *as_sets([*RUN, "train.max_steps=3"]), "--run-dir", "run").returncode
        == 0
    )
    res = cli(project, "export", "run", "--format", "safetensors")
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("cadence: error: ") and "your own model" in lines[0]


def test_tune_searches_the_user_module(project):
    (project / "space.yaml").write_text("optimizer.lr: {low: 0.01, high: 0.5, log: true}\n")
    res = cli(project, "tune", *as_sets([*RUN[:-2], "train.max_steps=10", "train.checkpoint_every=null"]),
              "--trials", "3", "--space", "space.yaml", "--pruner", "none", "--metric",
              "val_accuracy", "--out", "tune")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads((project / "tune" / "tune.json").read_text())
    assert result["direction"] == "maximize" and result["n_complete"] == 3
    assert "workload: mymodel:build" in (project / "tune" / "best.yaml").read_text()
