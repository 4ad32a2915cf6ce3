"""Keras runs exported as files TensorFlow loads (issue 35, part 3): .keras, SavedModel, TFLite.

Runs of the user module of test_keras_models (Keras on its torch backend, trained by cadence)
go through the real `cadence export` in forked children. What they write is then loaded in one
TensorFlow process started here, with plain TensorFlow and Keras calls (no cadence), and its
outputs are compared with the PyTorch model's, computed in this process from the run's
weights. TensorFlow never enters this process or the export's: the export's TensorFlow side runs
in a process of its own, and reports that it did so without torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import Forked, as_sets, run_forked

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover - another test chose the backend
    pytest.skip("keras was imported on another backend in this process", allow_module_level=True)
if importlib.util.find_spec("tensorflow") is None:  # found, never imported here
    pytest.skip("tensorflow is not installed", allow_module_level=True)

# Two models of the user's own making beside test_keras_models' mlp and cnn: one with an op
# TensorFlow has and TensorFlow Lite has no kernel for, one with a layer class of its own.
EXTRA = """

def sinh(cfg):
    inputs = keras.Input((2,))
    hidden = keras.ops.sinh(keras.layers.Dense(8)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    return cadence.DatasetWorkload(model, Blobs(64, 0), Blobs(32, 1), F.cross_entropy)


class Doubled(keras.layers.Layer):
    def call(self, x):
        return 2 * x


def custom(cfg):
    model = keras.Sequential([keras.Input((2,)), Doubled(), keras.layers.Dense(3)])
    return cadence.DatasetWorkload(model, Blobs(64, 0), Blobs(32, 1), F.cross_entropy)
"""
USER_MODULE = (Path(__file__).parent / "keras_user_module.py").read_text() + EXTRA
RUN = [
    "batch.size=16",
    "optimizer.name=adamw",
    "optimizer.lr=0.01",
    "train.eval_every=20",
    "train.log_every=20",
    "train.threads=1",
    "train.progress=false",
]
TOLERANCE = {"keras": 1e-5, "savedmodel": 1e-5, "tflite": 1e-4}
ARTIFACT = {"keras": "model.keras", "savedmodel": ".", "tflite": "model.tflite"}

# A TensorFlow user's code: load each file as TensorFlow documents it, run the inputs.
TF_USER = r"""
import json, sys
import numpy as np
import keras, tensorflow as tf

assert keras.backend.backend() == "tensorflow"
diffs = {}
for job in json.loads(sys.argv[1]):
    data = np.load(job["data"])
    x, y = data["x"], data["y"]
    if job["format"] == "keras":
        got = keras.models.load_model(job["path"])(x)
    elif job["format"] == "savedmodel":
        loaded = tf.saved_model.load(job["path"])
        got = loaded.serve(tf.constant(x))
    else:
        interpreter = tf.lite.Interpreter(model_path=job["path"])
        inp = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(inp["index"], list(x.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    diffs[job["name"]] = float(np.abs(np.asarray(got, np.float64) - y).max())
print(json.dumps(diffs))
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's project with each run trained once: a few steps are enough to export."""
    root = tmp_path_factory.mktemp("keras_export")
    (root / "kmodel.py").write_text(USER_MODULE)
    runs = {
        "mlp": ["workload=kmodel:mlp", "train.max_steps=20"],
        "cnn": ["workload=kmodel:cnn", "train.max_steps=20"],
        "sinh": ["workload=kmodel:sinh", "train.max_steps=2"],
        "custom": ["workload=kmodel:custom", "train.max_steps=2"],
        "digits": ["workload=digits", "model.hidden=[8]", "train.max_steps=2"],
    }
    for name, sets in runs.items():
        done = run_forked("train", *as_sets([*RUN, *sets]), "--run-dir", name, cwd=root)
        assert done.returncode == 0, done.stderr[-2000:]
    return root


def export(
    project: Path, run: str, fmt: str, *args: str, fake_tensorflow: Any = None
) -> tuple[subprocess.CompletedProcess[str], bool]:
    """`cadence export RUN --format FMT ARGS` in a forked child, and whether TensorFlow got into
    it. ``fake_tensorflow`` stands in for the export's TensorFlow side."""
    from cadence.cli import main

    assert "tensorflow" not in sys.modules  # so the child's answer is its own doing

    def target() -> int | None:
        if fake_tensorflow is not None:
            import cadence.deploy.export_keras

            cadence.deploy.export_keras._tensorflow = fake_tensorflow
        try:
            return main(["export", run, "--format", fmt, *args])
        finally:
            print(json.dumps({"tensorflow": "tensorflow" in sys.modules}))

    proc = Forked(target, cwd=project)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode is not None
    loaded = json.loads(out.strip().splitlines()[-1])["tensorflow"]
    return subprocess.CompletedProcess(["cadence", "export"], proc.returncode, out, err), loaded


@torch.no_grad()
def torch_reference(project: Path, run: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The run's model in PyTorch on its first 8 validation samples, from its saved weights."""
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.delitem(sys.modules, "kmodel", raising=False)
    import kmodel

    workload = getattr(kmodel, run)(None)
    workload.model.load_state_dict(load_file(project / run / "model.safetensors"))
    x, _ = workload.collate([workload.val_set[i] for i in range(8)])
    return {"x": x.numpy(), "y": workload.model.eval()(x).double().numpy()}


def test_exports_load_in_tensorflow_with_the_runs_outputs(project, monkeypatch, tmp_path):
    jobs, reported = [], {}
    # Every format on the MLP; the CNN's layers through TFLite, which converts a SavedModel of
    # it (TensorFlow imports in seconds: each export costs one process, the check one more).
    for run, formats in (("mlp", tuple(TOLERANCE)), ("cnn", ("tflite",))):
        np.savez(tmp_path / f"{run}.npz", **torch_reference(project, run, monkeypatch))
        for fmt in formats:
            done, tf_loaded = export(project, run, fmt)
            assert done.returncode == 0, done.stderr[-2000:]
            assert not tf_loaded, "TensorFlow was imported into the torch process"
            assert f"exported {fmt}" in done.stdout and "max abs diff" in done.stdout
            out = project / run / "export" / fmt
            manifest = json.loads((out / "export.json").read_text())
            assert manifest["torch_imported"] is False  # the TensorFlow side ran without torch
            assert manifest["max_abs_diff"] <= TOLERANCE[fmt], manifest
            reported[f"{run}/{fmt}"] = manifest["max_abs_diff"]
            path, data = str(out / ARTIFACT[fmt]), str(tmp_path / f"{run}.npz")
            jobs.append({"name": f"{run}/{fmt}", "format": fmt, "path": path, "data": data})
    assert (project / "mlp/export/savedmodel/saved_model.pb").is_file()
    assert not list(project.glob("*/export/.*"))  # no temporary folders left
    env = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    done = subprocess.run(
        [sys.executable, "-c", TF_USER, json.dumps(jobs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    diffs = json.loads(done.stdout.strip().splitlines()[-1])
    print("export's own check:", reported, "\nTensorFlow user's check:", diffs)
    for name, diff in diffs.items():
        assert diff <= TOLERANCE[name.split("/")[1]], (name, diff)
    assert len(diffs) == 4


def one_line_error(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert done.returncode == code, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def refused(project: Path, run: str, fmt: str, *needles: str) -> None:
    done, tf_loaded = export(project, run, fmt)
    one_line_error(done, 2, *needles)
    assert not (project / run / "export").exists()  # nothing written, no temporary folder
    assert not tf_loaded


def test_a_run_that_is_not_keras_is_refused(project):
    refused(project, "digits", "keras", "not a Keras model", "--format onnx or safetensors")


def test_layer_classes_of_the_users_own_are_refused(project):
    refused(project, "custom", "savedmodel", "kmodel.Doubled, a class of your own")


def test_a_model_tflite_cannot_convert_is_refused_and_nothing_is_left(project):
    """sinh: TensorFlow has the op (a SavedModel holds it), TensorFlow Lite has no kernel."""
    refused(
        project,
        "sinh",
        "tflite",
        "--format tflite: the model does not convert to TensorFlow Lite "
        "(no TensorFlow Lite kernel for Sinh); --format savedmodel holds it",
    )


def test_outputs_off_by_more_than_the_tolerance_fail_and_nothing_is_left(project):
    """The TensorFlow side measures, the export judges: here a side that answers 0.5 off."""

    def off(src: Path, out: Path, fmt: str) -> dict[str, Any]:
        out.mkdir()
        (out / "model.keras").write_bytes(b"")
        return {"files": ["model.keras"], "max_abs_diff": 0.5, "rebuilt_max_abs_diff": 0.0}

    done, _ = export(project, "mlp", "keras", "--out", "miss/keras", fake_tensorflow=off)
    one_line_error(done, 1, "keras outputs differ from PyTorch by 0.5 > tolerance 1e-05")
    assert not (project / "miss").exists()  # nor the folders it made for --out
