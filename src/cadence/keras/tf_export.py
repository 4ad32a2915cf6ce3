"""The TensorFlow half of ``cadence export --format keras | savedmodel | tflite``.

``python -m cadence.keras.tf_export SRC OUT FORMAT``, started by
:mod:`cadence.deploy.export_keras` with ``KERAS_BACKEND=tensorflow``. TensorFlow and PyTorch
never share a process: each brings its own thread pools, allocator and CUDA state, and a process
holding both is neither's tested configuration. So the torch side, which alone can rebuild the
user's model (their module imports torch), hands over plain files in SRC:

- ``model.json``: the architecture (Keras' ``to_json``; Keras' own layers and ops only),
- ``weights.npz``: the trained weights in ``get_weights()`` order (``w0``, ``w1``, ...),
- ``reference.npz``: inputs ``x`` and the PyTorch model's outputs ``y`` on them.

This side rebuilds the model, sets the weights, writes FORMAT into the new folder OUT
(``model.keras``; the SavedModel itself; ``model.tflite``), then loads what it wrote the way a
TensorFlow user would and measures it against ``y``. The parent decides on the tolerance, owns
the temporary folders and moves OUT into place, so a failure here leaves nothing behind.

Its answer is the last line of stdout, one JSON object: exit 0 with the measurements, or exit 2
with ``{"error": ...}`` when the model cannot take this form (the parent's one-line user error).
Anything else is a crash, its traceback on stderr. This module imports nothing of cadence's
torch side; the answer says whether torch was loaded all the same (``torch_imported``).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np

__all__ = ["FORMATS", "main"]

FORMATS = ("keras", "savedmodel", "tflite")
UNSUPPORTED = 2  # exit status: the model cannot take this form (a user error, not a crash)

# What a format does with a model, for the one-line error when it cannot.
_VERB = {
    "keras": "save as a .keras file",
    "savedmodel": "export as a TensorFlow SavedModel",
    "tflite": "convert to TensorFlow Lite",
}


class Unsupported(Exception):
    """The model cannot be rebuilt or written in the asked format; the message says why."""


def _reason(exc: BaseException) -> str:
    """One readable line from an exception. The TFLite converter's message opens with MLIR
    locations; the op it lacks a kernel for is what a person can act on."""
    text = str(exc)
    ops = sorted(set(re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", text)))
    if ops:
        return f"no TensorFlow Lite kernel for {', '.join(ops)}"
    errors = getattr(exc, "errors", None)  # the converter's structured errors, where it has them
    if errors and getattr(errors[0], "error_message", ""):
        text = errors[0].error_message
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:240] if lines else type(exc).__name__


def _max_diff(a: Any, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    if a.shape != b.shape:
        raise Unsupported(f"outputs of shape {a.shape}, the PyTorch model's are {b.shape}")
    return float(np.abs(a - b.astype(np.float64)).max())


def _rebuild(src: Path) -> Any:
    """The Keras model of SRC with its trained weights, on the TensorFlow backend."""
    architecture = (src / "model.json").read_text()
    try:
        model = keras.models.model_from_json(architecture)
    except Exception as exc:  # noqa: BLE001 - a class TensorFlow's Keras does not know
        raise Unsupported(
            f"the architecture does not rebuild under TensorFlow ({_reason(exc)})"
        ) from None
    with np.load(src / "weights.npz") as npz:
        model.set_weights([npz[f"w{i}"] for i in range(len(npz.files))])
    return model


def _write(model: Any, out: Path, fmt: str, scratch: Path) -> None:
    """FORMAT into the new folder ``out``; :class:`Unsupported` if the model cannot take it."""
    import tensorflow as tf

    saved = out if fmt == "savedmodel" else scratch / "saved"
    try:
        if fmt == "keras":
            out.mkdir()
            model.save(out / "model.keras")
            return
        model.export(str(saved), format="tf_saved_model", verbose=False)
    except Exception as exc:  # noqa: BLE001 - a layer or op this format cannot hold
        raise Unsupported(f"the model does not {_VERB[fmt]} ({_reason(exc)})") from None
    if fmt == "tflite":  # from the SavedModel: the converter's best-supported entry point
        try:
            flatbuffer = tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert()
        except Exception as exc:  # noqa: BLE001 - an op without a TFLite kernel
            raise Unsupported(
                f"the model does not {_VERB[fmt]} ({_reason(exc)}); --format savedmodel holds it"
            ) from None
        out.mkdir()
        (out / "model.tflite").write_bytes(flatbuffer)


def _tflite_interpreter(path: Path) -> Any:
    """LiteRT's interpreter where installed; TensorFlow's own (deprecated, still shipped)."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # type: ignore[import-not-found]
    except ImportError:
        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter(model_path=str(path))
    return Interpreter(model_path=str(path))


def _reload_outputs(out: Path, fmt: str, x: np.ndarray) -> np.ndarray:
    """The outputs of what was written, loaded as a TensorFlow user loads it."""
    import tensorflow as tf

    if fmt == "keras":
        return keras.ops.convert_to_numpy(keras.models.load_model(out / "model.keras")(x))
    if fmt == "savedmodel":
        loaded = tf.saved_model.load(str(out))  # held: its functions need its variables alive
        return loaded.serve(tf.constant(x)).numpy()
    interpreter = _tflite_interpreter(out / "model.tflite")
    (inp,), (res,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x.astype(inp["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(res["index"])


def export(src: Path, out: Path, fmt: str) -> dict[str, Any]:
    """Rebuild, write FORMAT into ``out`` and measure it; raises :class:`Unsupported`."""
    import tensorflow as tf

    model = _rebuild(src)
    with np.load(src / "reference.npz") as ref:
        x, y = ref["x"], ref["y"]
    rebuilt = _max_diff(keras.ops.convert_to_numpy(model(x, training=False)), y)
    with tempfile.TemporaryDirectory(dir=src) as scratch:
        _write(model, out, fmt, Path(scratch))
    return {
        "files": sorted(p.name for p in out.iterdir()),
        "max_abs_diff": _max_diff(_reload_outputs(out, fmt, x), y),
        "rebuilt_max_abs_diff": rebuilt,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "torch_imported": "torch" in sys.modules,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[2] not in FORMATS:
        print(f"usage: python -m cadence.keras.tf_export SRC OUT {'|'.join(FORMATS)}")
        return 64
    src, out, fmt = Path(args[0]), Path(args[1]), args[2]
    if keras.backend.backend() != "tensorflow":
        answer: dict[str, Any] = {
            "error": f"Keras runs on {keras.backend.backend()} here; set KERAS_BACKEND=tensorflow"
        }
        code = UNSUPPORTED
    else:
        try:
            answer, code = export(src, out, fmt), 0
        except Unsupported as exc:
            answer, code = {"error": str(exc)}, UNSUPPORTED
    sys.stdout.write("\n" + json.dumps(answer) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
