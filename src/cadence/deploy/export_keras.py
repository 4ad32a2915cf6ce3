"""Export a Keras run as files TensorFlow loads: ``.keras``, a SavedModel or TensorFlow Lite.

A Keras model trained by cadence ran on Keras' torch backend; TensorFlow users want it on theirs.
The model exists only in the user's code, which imports torch, and TensorFlow must never share a
process with PyTorch, so the export runs in two:

1. here, in the export command's process (torch): rebuild the run's workload from its config,
   load the trained weights, and hand over plain files: the architecture (``to_json``), the
   weights (``get_weights()`` order) and reference outputs of the PyTorch model on the first
   validation samples;
2. ``python -m cadence.keras.tf_export`` (TensorFlow backend, CPU, no torch): rebuild from those
   files, write the format, reload it as a TensorFlow user would and measure it.

The output folder (default ``RUN/export/FORMAT``) holds ``model.keras``, the SavedModel itself
(``tf.saved_model.load(folder)``) or ``model.tflite``, and ``export.json``. Everything is built
in a temporary folder beside it and moved in only after the check passed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cadence.config import ConfigError, parse_config
from cadence.deploy.export import ExportResult
from cadence.deploy.rundir import checkpoint_dir, load_weights, weights_file
from cadence.io import atomic_write_json
from cadence.models.keras_module import KerasModule
from cadence.workloads import build_workload, check_config, is_import_path

__all__ = ["KERAS_FORMATS", "TOLERANCE", "export_keras"]

KERAS_FORMATS = ("keras", "savedmodel", "tflite")
# Max |TensorFlow - PyTorch| on the reference outputs. The same fp32 weights through another
# framework's kernels differ in summation order only (~1e-7 on small models); TFLite's kernels
# (XNNPACK) reassociate more. A wrong layout or weight is off by O(0.1).
TOLERANCE = {"keras": 1e-5, "savedmodel": 1e-5, "tflite": 1e-4}
REFERENCE_SAMPLES = 4
_WHERE = {"keras": "model.keras", "savedmodel": "the folder itself", "tflite": "model.tflite"}
_VERSIONS = ("tensorflow", "keras", "torch_imported")  # what the TensorFlow side ran with


def _torch_backend() -> None:
    """The user's module imports keras as the workload is rebuilt: on the torch backend the
    run trained on, whatever the shell's KERAS_BACKEND says."""
    keras = sys.modules.get("keras")
    if keras is None:
        os.environ["KERAS_BACKEND"] = "torch"
        os.environ["KERAS_TORCH_DEVICE"] = "cpu"  # the export reads and runs it on the CPU
    elif keras.backend.backend() != "torch":
        raise ConfigError(
            f"KERAS_BACKEND: keras is loaded on {keras.backend.backend()} in this process; "
            "a Keras run's export rebuilds it on torch (run `cadence export` on its own)"
        )


@contextlib.contextmanager
def _tensorflow_blocked() -> Iterator[None]:
    """Keras' serialisation asks whether TensorFlow is installed, which imports it: marking it
    absent keeps this torch process free of it (the architecture holds no TensorFlow objects).
    Keras caches the answer; it is cleared again, so the process is left as it was found."""
    if "tensorflow" in sys.modules:  # someone loaded it already: nothing left to keep out
        yield
        return
    sys.modules["tensorflow"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]
        lazy = getattr(sys.modules.get("keras.src.utils.module_utils"), "tensorflow", None)
        if getattr(lazy, "module", 0) is None and hasattr(lazy, "_available"):
            lazy._available = None  # type: ignore[union-attr]


def _foreign_classes(model: Any) -> list[str]:
    """Classes in the model that are not Keras' own: TensorFlow's Keras cannot rebuild them."""
    cls = type(model)
    found = [] if cls.__module__.split(".")[0] == "keras" else [f"{cls.__module__}.{cls.__name__}"]
    children = getattr(model, "operations", None) or getattr(model, "layers", None) or []
    for child in children:
        found += [c for c in _foreign_classes(child) if c not in found]
    return found


def _not_keras(run_dir: Path, fmt: str, what: str, hint: str) -> ConfigError:
    return ConfigError(
        f"--format {fmt}: {run_dir} holds the {what}, not a Keras model; keras, savedmodel and "
        f"tflite export Keras models (KERAS_BACKEND=torch runs); {hint}"
    )


def _keras_run(
    run_dir: Path, fmt: str, ema: bool, checkpoint: str | None, lawa: bool
) -> tuple[Any, Path]:
    """The run's workload, its Keras model holding the weights asked for; refusals in one line."""
    cfg_path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir}: run directory not found; pass a folder `cadence train` wrote"
        )
    if not cfg_path.is_file():
        raise ConfigError(f"{cfg_path}: not found; {run_dir} is not a cadence run directory")
    if lawa and (ema or checkpoint):
        raise ConfigError("--lawa: reads model_lawa.safetensors; not with --ema or --checkpoint")
    _torch_backend()  # before check_config imports the user's module, and with it keras
    try:
        cfg = parse_config(cfg_path)
        check_config(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{cfg_path}: {exc}") from None
    if not is_import_path(cfg.workload):
        what = f"built-in {cfg.workload} model"
        raise _not_keras(run_dir, fmt, what, "use --format onnx or safetensors")
    weights = (
        checkpoint_dir(run_dir, checkpoint) if checkpoint else weights_file(run_dir, ema, lawa)
    )
    cfg.train.device = "cpu"
    workload = build_workload(cfg)
    module = workload.model
    if not isinstance(module, KerasModule):
        what = f"{type(module).__name__} of {cfg.workload}"
        raise _not_keras(run_dir, fmt, what, f"its trained weights are {weights}")
    foreign = _foreign_classes(module.keras_model)
    if foreign:
        raise ConfigError(
            f"--format {fmt}: the model uses {', '.join(foreign)}, a class of your own; "
            "TensorFlow rebuilds only models of Keras' own layers and ops (Sequential or "
            "functional)"
        )
    keras_model = module.keras_model
    if len(keras_model.inputs) != 1 or len(keras_model.outputs) != 1:
        raise ConfigError(f"--format {fmt}: exports models of one input and one output")
    load_weights(module, weights, from_checkpoint=bool(checkpoint), ema=ema)
    return workload, weights


@torch.no_grad()
def _hand_over(workload: Any, folder: Path) -> dict[str, Any]:
    """Architecture, weights and reference outputs for the TensorFlow side, in ``folder``."""
    module = workload.model.eval()
    keras_model = module.keras_model
    spec = keras_model.inputs[0]
    if hasattr(workload, "val_set"):  # a DatasetWorkload: real inputs, in the model's layout
        n = min(REFERENCE_SAMPLES, len(workload.val_set))
        x, _ = workload.collate([workload.val_set[i] for i in range(n)])
    elif all(d is not None for d in spec.shape[1:]):  # a Workload of the user's own making
        g = torch.Generator().manual_seed(0)
        x = torch.randn((REFERENCE_SAMPLES, *spec.shape[1:]), generator=g)
    else:
        raise ConfigError("export: no validation set to draw reference inputs from")
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"export: the model's inputs are {type(x).__name__}, not one tensor")
    x = np.ascontiguousarray(x.cpu().numpy(), dtype=spec.dtype)
    with sys.modules["keras"].device("cpu"):  # Keras' own placement, where CUDA is present
        y = module(torch.from_numpy(x))
    if not isinstance(y, torch.Tensor):
        raise ConfigError(f"export: the model returns {type(y).__name__}, not a tensor")
    with _tensorflow_blocked():
        (folder / "model.json").write_text(keras_model.to_json())
    weights = keras_model.get_weights()
    np.savez(folder / "weights.npz", **{f"w{i}": w for i, w in enumerate(weights)})
    np.savez(folder / "reference.npz", x=x, y=y.cpu().numpy())
    return {"input": {"shape": list(spec.shape), "dtype": str(spec.dtype)}, "samples": len(x)}


def _tensorflow(src: Path, out: Path, fmt: str) -> dict[str, Any]:
    """Run the TensorFlow side; its answer, or the error it reports in one line."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    env = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "CUDA_VISIBLE_DEVICES": "",  # CPU: the answer must not depend on a GPU's kernels
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": package_root + (os.pathsep + path if path else ""),
    }
    cmd = [sys.executable, "-m", "cadence.keras.tf_export", str(src), str(out), fmt]
    done = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        answer = None
    if isinstance(answer, dict) and done.returncode == 2 and "error" in answer:
        raise ConfigError(f"--format {fmt}: {answer['error']}")
    if done.returncode != 0 or not isinstance(answer, dict):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise RuntimeError(f"export: the TensorFlow process failed ({tail}); nothing was written")
    return answer


def export_keras(
    run_dir: str | Path,
    fmt: str,
    out: str | Path | None = None,
    ema: bool = False,
    checkpoint: str | None = None,
    lawa: bool = False,
    quantize: str | None = None,
    tolerance: float | None = None,
) -> ExportResult:
    """Export a Keras run as ``keras``, ``savedmodel`` or ``tflite`` into ``out`` (default
    RUN/export/FMT), checked against the PyTorch model to ``tolerance`` (:data:`TOLERANCE`).

    Refusals (not a Keras run, classes of the user's own, an op TFLite lacks) raise a one-line
    ``ConfigError``; a parity miss raises ``RuntimeError``. Either way nothing is written.
    """
    if fmt not in KERAS_FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(KERAS_FORMATS)}")
    if quantize:
        raise ConfigError(f"--quantize {quantize}: needs --format onnx (it quantises ONNX)")
    run_path = Path(run_dir)
    workload, weights = _keras_run(run_path, fmt, ema, checkpoint, lawa)
    dest = Path(out) if out is not None else run_path / "export" / fmt
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"--out {dest}: exists and is not a folder")
    made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)).resolve()
    try:
        (tmp / "src").mkdir()
        handed = _hand_over(workload, tmp / "src")
        answer = _tensorflow(tmp / "src", tmp / "out", fmt)
        tol = TOLERANCE[fmt] if tolerance is None else tolerance
        diff = float(answer["max_abs_diff"])
        if not diff <= tol:
            raise RuntimeError(
                f"export: {fmt} outputs differ from PyTorch by {diff:.3g} > tolerance {tol:g} "
                f"(the rebuilt Keras model: {answer['rebuilt_max_abs_diff']:.3g}); "
                "nothing was written"
            )
        result = ExportResult(fmt, dest, [*answer["files"], "export.json"], diff, tol)
        manifest: dict[str, Any] = {
            "format": fmt,
            "model": _WHERE[fmt],
            "max_abs_diff": diff,
            "tolerance": tol,
            "rebuilt_max_abs_diff": answer["rebuilt_max_abs_diff"],
            "reference_samples": handed["samples"],
            "input": handed["input"],
            "source": str(run_path.resolve()),
            "weights": weights.name,
            "workload": workload.name,
            **{k: answer[k] for k in _VERSIONS},
        }
        atomic_write_json(tmp / "out" / "export.json", manifest)
        dest.mkdir(parents=True, exist_ok=True)
        for name in result.files:  # an earlier export's folder (variables/) is replaced whole
            if (dest / name).is_dir():
                shutil.rmtree(dest / name)
            os.replace(tmp / "out" / name, dest / name)
        made = []
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # the parents this failed export created, innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
