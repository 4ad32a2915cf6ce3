"""Keras models trained by cadence (issue 35, part 2): Keras 3 on its torch backend.

The models live in a user's module, as in test_own_model, and are built by plain Keras code; the
runs go through the real CLI (forked children): every optimizer family, SIGKILL and resume, two
processes. The module imports keras with KERAS_BACKEND=torch, as a user's project would; this
file imports it the same way first, so that the forked children start with it imported.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import torch
from resume_helpers import assert_same_run, wait_for_step
from safetensors.torch import load_file

from cli_helpers import ForkedCLI, as_sets, run_forked

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover - another test chose the backend
    pytest.skip("keras was imported on another backend in this process", allow_module_level=True)

USER_MODULE = (Path(__file__).parent / "keras_user_module.py").read_text()

RUN = [
    "batch.size=16",
    "train.max_steps=30",
    "train.eval_every=10",
    "train.log_every=1",
    "train.threads=1",
    "train.progress=false",
]
OPTIMIZERS = {
    "adamw": ["optimizer.name=adamw", "optimizer.lr=0.01"],
    "muon": ["optimizer.name=muon", "optimizer.lr=0.02"],
    "sgd+momentum": ["optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9"],
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "kmodel.py").write_text(USER_MODULE)
    return tmp_path


def train(project: Path, *args: str) -> None:
    done = run_forked("train", *args, timeout=300, cwd=project)
    assert done.returncode == 0, done.stderr[-2000:]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").open()]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_keras_models_train_with_cadence_optimizers(project, model, optimizer):
    sets = [f"workload=kmodel:{model}", *OPTIMIZERS[optimizer], *RUN]
    train(project, *as_sets(sets), "--run-dir", "run")
    seen = losses(project / "run")
    assert len(seen) == 30
    assert sum(seen[-5:]) < 0.7 * sum(seen[:5]), seen  # the loss falls
    summary = json.loads((project / "run" / "summary.json").read_text())
    assert summary["best_metric"] > 0.5  # well above chance (1/3, 1/4)


def test_sigkill_then_resume_is_the_uninterrupted_run(project):
    """The CNN has dropout: Keras draws its masks from a seed variable the checkpoint holds."""
    sets = ["workload=kmodel:cnn", *OPTIMIZERS["adamw"], *RUN, "train.checkpoint_every=3"]
    train(project, *as_sets(sets), "--run-dir", "straight")
    args = ["train", *as_sets(sets), "--run-dir", "run"]
    rng, reached = random.Random(3), 0
    for _ in range(2):
        proc = ForkedCLI(*args, cwd=project)
        reached = wait_for_step(
            proc, project / "run" / "metrics.jsonl", reached + rng.randint(4, 9)
        )
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        args = ["train", "--resume", "run"]
    train(project, *args[1:])
    assert_same_run(project / "straight", project / "run", range(1, 31))


def test_two_processes_train_the_same_run_as_one(project):
    sets = ["workload=kmodel:mlp", *OPTIMIZERS["sgd+momentum"], *RUN]
    train(project, *as_sets(sets), "--run-dir", "one")
    train(project, *as_sets(sets), "--nproc", "2", "--run-dir", "two")
    s1, s2 = (json.loads((project / d / "summary.json").read_text()) for d in ("one", "two"))
    assert (s2["world_size"], s2["steps"]) == (2, s1["steps"])
    assert losses(project / "two") == pytest.approx(losses(project / "one"), rel=1e-4)
    w1, w2 = (load_file(project / d / "model.safetensors") for d in ("one", "two"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_keras_layers_get_cadence_parameter_roles(project, monkeypatch):
    """Muon takes the hidden Dense kernels only (not the head, not the conv kernel); biases
    are not decayed; the names do not depend on what else the process built."""
    from cadence.optim.groups import muon_split, param_groups
    from cadence.workloads import DatasetWorkload

    monkeypatch.syspath_prepend(str(project))
    monkeypatch.delitem(sys.modules, "kmodel", raising=False)
    import kmodel

    first = kmodel.cnn(None).model
    second = kmodel.cnn(None).model  # Keras names its layers dense_2, dense_3 now
    assert [n for n, _ in first.named_parameters()] == [n for n, _ in second.named_parameters()]
    shapes = {n: tuple(p.shape) for n, p in second.named_parameters()}
    assert shapes["keras.0_conv2d.kernel"] == (3, 3, 1, 4)
    assert shapes["keras.3_dense.kernel"] == (144, 16) and shapes["keras.4_dense.bias"] == (4,)
    assert "keras.2_dropout.seed_generator_state" in dict(second.state_dict())
    muon, adamw = muon_split(second)
    kernels = {id(p) for p in muon}
    named = dict(second.named_parameters())
    assert kernels == {id(named[n]) for n in second.hidden_matrix_names()}
    assert [tuple(p.shape) for p in muon] == [(144, 16)]  # the hidden Dense; head (16, 4) not
    no_decay = next(g for g in param_groups(second, 0.1) if g["group_name"] == "no_decay")
    assert all(p.ndim == 1 for p in no_decay["params"])
    assert isinstance(
        DatasetWorkload(first, [(0, 0)], [(0, 0)], lambda a, b: a).model, type(second)
    )
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError, match="KERAS_BACKEND=torch"):
        kmodel.mlp(None)
