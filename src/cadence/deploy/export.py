"""Export a run: consolidated safetensors, ONNX checked against PyTorch, or the HF format.

Both formats write a self-describing folder: the weights (or graph), the run's ``config.yaml``,
the ``tokenizer.json`` of language models and an ``export.json`` manifest that records what was
exported and how well it matches. A safetensors export is itself a loadable run directory, so
``cadence generate`` and ``cadence serve`` accept it. Files are written to a temporary folder and
moved into place only when every check passed, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cadence.config import ConfigError, dump_config
from cadence.data.chat import DEFAULT_TEMPLATE, TEMPLATE_FILE
from cadence.data.tokenizers import PretrainedTokenizer
from cadence.deploy.kinds import task_for
from cadence.deploy.rundir import LoadedRun, load_run
from cadence.io import atomic_write_text

__all__ = ["FORMATS", "ONNX_TOLERANCE", "ExportResult", "export_run", "random_inputs"]

FORMATS = ("safetensors", "onnx", "hf", "peft")

# Max |onnxruntime - PyTorch| allowed on the exported outputs (logits). fp32 kernels differ in
# summation order only, which on these models stays around 1e-6; 1e-4 leaves headroom for
# wider models without hiding a real mismatch (a wrong op is off by O(1)).
ONNX_TOLERANCE = 1e-4


@dataclass
class ExportResult:
    """What an export wrote and how closely the exported model matches the run's."""

    format: str
    out: Path
    files: list[str]
    max_abs_diff: float  # exported vs the run's model, on random inputs
    tolerance: float
    quantization: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def random_inputs(run: LoadedRun, seed: int = 0) -> list[torch.Tensor]:
    """Inputs of several batch sizes (and lengths, where the kind takes any) to compare
    outputs on."""
    return task_for(run).sample_inputs(run, seed)


class _Logits(nn.Module):
    """A one-input view of the model, so the exported graph has exactly one named input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@torch.no_grad()
def _torch_outputs(model: nn.Module, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    return [model(x).numpy() for x in inputs]


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(
        max(np.abs(x.astype(np.float64) - y.astype(np.float64)).max() for x, y in zip(a, b))
    )


def copy_chat_template(run: LoadedRun, dst: Path) -> list[str]:
    """The chat template a chat run was trained with travels with its exports; a language model
    with one of cadence's own tokenizers (byte, BPE) gets cadence's default, the one chat
    training and serving use for them, so that ``apply_chat_template`` on the export, a
    fine-tuning of it and ``cadence serve`` all render conversations alike. A model folder's
    own tokenizer keeps whatever its files hold."""
    src = run.path / TEMPLATE_FILE
    if src.is_file():
        shutil.copyfile(src, dst / TEMPLATE_FILE)
    elif run.tokenizer is not None and not isinstance(run.tokenizer, PretrainedTokenizer):
        atomic_write_text(dst / TEMPLATE_FILE, DEFAULT_TEMPLATE)
    else:
        return []
    return [TEMPLATE_FILE]


def _copy_metadata(run: LoadedRun, dst: Path) -> list[str]:
    (dst / "config.yaml").write_text(dump_config(run.config))
    files = ["config.yaml"]
    if run.labels is not None:
        (dst / "labels.json").write_text(json.dumps(run.labels) + "\n")
        files.append("labels.json")
    if run.tokenizer is not None:
        run.tokenizer.save(dst)  # type: ignore[attr-defined]
        files.append("tokenizer.json")
        files += list(getattr(run.tokenizer, "files", {}))  # a pretrained tokenizer's config
    files += copy_chat_template(run, dst)
    save_config = getattr(run.model, "save_config", None)
    if callable(save_config):  # a Hugging Face model's shape (hf/config.json)
        save_config(dst)
        files.append("hf")
    return files


def _export_safetensors(run: LoadedRun, tmp: Path) -> tuple[list[str], float]:
    from safetensors.torch import save_model

    save_model(run.model, str(tmp / "model.safetensors"))
    files = ["model.safetensors", *_copy_metadata(run, tmp)]
    # Round trip: rebuild from what was written, exactly as a user of the export would.
    rebuilt = load_run(tmp)
    inputs = random_inputs(run)
    return files, _max_diff(
        _torch_outputs(run.model, inputs), _torch_outputs(rebuilt.model, inputs)
    )


def _ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_outputs(session: Any, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    name = session.get_inputs()[0].name
    return [session.run(None, {name: x.numpy()})[0] for x in inputs]


def _export_onnx(run: LoadedRun, tmp: Path) -> tuple[list[str], float]:
    from torch.export import Dim

    task = task_for(run)
    example = random_inputs(run)[-1]
    dims: dict[int, Any] = {0: Dim("batch", min=1, max=4096), **task.dynamic_dims(run)}
    program = torch.onnx.export(
        _Logits(run.model).eval(),
        (example,),
        dynamo=True,
        dynamic_shapes=(dims,),
        input_names=[task.input_name],
        output_names=[task.output_name],
        verbose=False,
    )
    program.save(str(tmp / "model.onnx"))
    inputs = random_inputs(run, seed=1)  # not the tracing example
    diff = _max_diff(
        _torch_outputs(run.model, inputs), _ort_outputs(_ort_session(tmp / "model.onnx"), inputs)
    )
    return ["model.onnx", *_copy_metadata(run, tmp)], diff


@torch.no_grad()
def _quantize(run: LoadedRun, tmp: Path) -> dict[str, Any]:
    """Dynamic int8 weights for CPU, scored against fp32 on the workload's validation data."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from cadence.workloads import build_workload

    quantize_dynamic(
        str(tmp / "model.onnx"), str(tmp / "model.int8.onnx"), weight_type=QuantType.QInt8
    )
    fp32, int8 = _ort_session(tmp / "model.onnx"), _ort_session(tmp / "model.int8.onnx")
    inputs = random_inputs(run, seed=2)
    report: dict[str, Any] = {
        "file": "model.int8.onnx",
        "bytes_fp32": (tmp / "model.onnx").stat().st_size,
        "bytes_int8": (tmp / "model.int8.onnx").stat().st_size,
        "max_abs_diff_logits": _max_diff(_ort_outputs(fp32, inputs), _ort_outputs(int8, inputs)),
    }
    cfg = run.config
    cfg.train.device = "cpu"
    workload = build_workload(cfg)
    task = task_for(run)
    n = min(workload.val_size, task.val_examples)
    graphs = {
        label: (lambda x, s=session: _ort_outputs(s, [x])[0])
        for label, session in (("fp32", fp32), ("int8", int8))
    }
    report.update(task.quantized_quality(run, workload, n, graphs))
    report["val_examples"] = n
    return report


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path | None = None,
    ema: bool = False,
    quantize: str | None = None,
    tolerance: float = ONNX_TOLERANCE,
    checkpoint: str | None = None,
    lawa: bool = False,
) -> ExportResult:
    """Export ``run_dir`` as ``safetensors``, ``onnx``, ``hf`` or ``peft`` into ``out`` (default
    RUN/export/FMT); ``hf`` is the Hugging Face format (see :mod:`cadence.deploy.export_hf`),
    ``peft`` a ``model.peft`` run's adapters alone (:mod:`cadence.deploy.export_peft`); the
    other formats hold the adapters merged into the weights.

    ``checkpoint`` exports one of the run's checkpoints instead of its final weights; a sharded
    (FSDP) checkpoint is consolidated into one whole model on the way.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format: unknown format {fmt!r}; choose {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize: unknown scheme {quantize!r}; the only one is int8")
    if quantize and fmt != "onnx":
        raise ConfigError("--quantize int8: needs --format onnx (it quantises the ONNX graph)")
    run = load_run(run_dir, ema=ema, checkpoint=checkpoint, lawa=lawa, merge=fmt != "peft")
    task = task_for(run)
    if fmt not in task.formats:
        raise ConfigError(
            f"--format {fmt}: {run.what} has no {fmt} form; use --format "
            f"{' or '.join(task.formats)}"
        )
    if quantize and run.dtype != torch.float32:
        raise ConfigError(
            f"--quantize int8: the {run.config.workload} model is {run.dtype}; "
            "dynamic int8 quantisation needs a float32 model"
        )
    dest = Path(out) if out is not None else Path(run_dir) / "export" / fmt
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"--out {dest}: exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        if fmt == "safetensors":
            files, diff = _export_safetensors(run, tmp)
            tol = 0.0  # the same weights in the same PyTorch model: bit-identical outputs
        elif fmt == "hf":
            from cadence.deploy.export_hf import HF_TOLERANCE, export_hf

            files, diff = export_hf(run, tmp, random_inputs(run))
            files += [f for f in copy_chat_template(run, tmp) if f not in files]
            tol = HF_TOLERANCE
        elif fmt == "peft":
            from cadence.deploy.export_hf import HF_TOLERANCE
            from cadence.deploy.export_peft import export_peft

            files, diff = export_peft(run, tmp, random_inputs(run))
            files += copy_chat_template(run, tmp)
            tol = HF_TOLERANCE
        else:
            files, diff = _export_onnx(run, tmp)
            tol = tolerance
        result = ExportResult(fmt, dest, files, diff, tol)
        if diff > tol:
            raise RuntimeError(
                f"export: {fmt} outputs differ from PyTorch by {diff:.3g} > tolerance {tol:g}; "
                "nothing was written"
            )
        if quantize:
            result.quantization = _quantize(run, tmp)
            result.files.append("model.int8.onnx")
        manifest = {
            **{k: v for k, v in asdict(result).items() if k not in ("out", "files")},
            "source": str(Path(run_dir).resolve()),
            "weights": run.weights.name,
            "workload": run.config.workload,
            "kind": run.kind.value,
            "input": task.input_spec(run),
            **({"labels": run.labels} if run.labels is not None else {}),
            "output": {"name": task.output_name},
        }
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
        result.files.append("export.json")
        dest.mkdir(parents=True, exist_ok=True)
        for name in result.files:
            if (dest / name).is_dir():  # a folder (hf/) of an earlier export: replace it whole
                shutil.rmtree(dest / name)
            os.replace(tmp / name, dest / name)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
