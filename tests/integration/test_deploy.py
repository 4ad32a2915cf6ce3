"""Export round trips (safetensors, ONNX, int8) and the `generate` / `export` commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from resume_helpers import train_tiny_lm
from rich.console import Console
from safetensors.torch import save_model

import cadence
from cadence.config import ConfigError, dump_config
from cadence.deploy.export import ONNX_TOLERANCE, ExportResult, export_run, random_inputs
from cadence.deploy.rundir import load_run
from cadence.models.generate import SamplingParams, generate
from cadence.workloads import build_model


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) training run with EMA, so both weight files exist."""
    return train_tiny_lm(tmp_path_factory.mktemp("deploy") / "lm", "train.ema=0.9")


def _hand_built(root: Path, name: str, overrides: list[str]) -> Path:
    run_dir = root / name
    run_dir.mkdir()
    cfg = cadence.load_config(None, ["schedule.warmup=0", *overrides])
    torch.manual_seed(0)
    save_model(build_model(cfg), str(run_dir / "model.safetensors"))
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _hand_built(tmp_path_factory.mktemp("deploy"), "digits", ["workload=digits"])


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _hand_built(
        tmp_path_factory.mktemp("deploy"), "cnn", ["workload=mnist", "model.arch=cnn"]
    )


@pytest.fixture(scope="module")
def logreg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _hand_built(tmp_path_factory.mktemp("deploy"), "logreg", ["workload=logreg"])


def _parse(*argv: str) -> argparse.Namespace:
    from cadence.cli.deploy import add_parsers

    parser = argparse.ArgumentParser(prog="cadence")
    add_parsers(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


# ---------------------------------------------------------------- safetensors


@pytest.mark.parametrize("ema", [False, True], ids=["final", "ema"])
def test_safetensors_export_rebuilds_the_same_model(
    lm_run: Path, tmp_path: Path, ema: bool
) -> None:
    result = export_run(lm_run, "safetensors", tmp_path / "out", ema=ema)
    assert result.max_abs_diff == 0.0
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "config.yaml",
        "tokenizer.json",
        "export.json",
        "chat_template.jinja",  # cadence's default, for a byte-tokenizer language model
    }
    from cadence.data.chat import DEFAULT_TEMPLATE

    assert (out / "chat_template.jinja").read_text() == DEFAULT_TEMPLATE
    original, exported = load_run(lm_run, ema=ema), load_run(out)
    assert original.weights.name == ("model_ema.safetensors" if ema else "model.safetensors")
    for x in random_inputs(original):
        with torch.no_grad():
            assert torch.equal(original.model(x), exported.model(x))
    # The export is a run directory in its own right: generation gives the same tokens.
    params = SamplingParams(20, 0.8, seed=1)
    assert list(generate(exported.model, [1, 2, 3], params)) == list(
        generate(original.model, [1, 2, 3], params)
    )
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["kind"] == "lm" and manifest["format"] == "safetensors"


def test_safetensors_export_of_classifier(logreg_run: Path, tmp_path: Path) -> None:
    result = export_run(logreg_run, "safetensors", tmp_path / "out")
    assert result.max_abs_diff == 0.0 and "tokenizer.json" not in result.files
    assert load_run(tmp_path / "out").dtype == torch.float64


# ---------------------------------------------------------------- onnx


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def lm_onnx(lm_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExportResult]:
    """The GPT's ONNX export with its int8 graph (the fp32 graph is the same either way); an
    export traces the model through torch.export, seconds that two tests need not pay twice."""
    out = tmp_path_factory.mktemp("deploy") / "onnx"
    return out, export_run(lm_run, "onnx", out, quantize="int8")


def test_onnx_export_of_gpt_matches_pytorch_with_dynamic_axes(
    lm_run: Path, lm_onnx: tuple[Path, ExportResult]
) -> None:
    out, result = lm_onnx
    assert result.max_abs_diff < ONNX_TOLERANCE
    session = _session(out / "model.onnx")
    (inp,) = session.get_inputs()
    assert inp.name == "idx" and inp.shape == ["batch", "seq"]
    run = load_run(lm_run)
    g = torch.Generator().manual_seed(42)
    for shape in [(1, 7), (4, 32), (2, 3)]:  # batch and sequence lengths not traced
        x = torch.randint(0, run.tokenizer.vocab_size, shape, generator=g)
        with torch.no_grad():
            ref = run.model(x).numpy()
        got = session.run(None, {"idx": x.numpy()})[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < ONNX_TOLERANCE


def test_onnx_export_of_cnn_with_int8_quantisation(cnn_run: Path, tmp_path: Path) -> None:
    result = export_run(cnn_run, "onnx", tmp_path / "onnx", quantize="int8")
    assert result.max_abs_diff < ONNX_TOLERANCE
    q = result.quantization
    assert q is not None and (tmp_path / "onnx" / "model.int8.onnx").is_file()
    assert q["bytes_int8"] < q["bytes_fp32"]
    for key in ("val_loss_change", "val_accuracy_change", "max_abs_diff_logits"):
        assert np.isfinite(q[key])
    x = torch.randn(6, 1, 28, 28)
    got = _session(tmp_path / "onnx" / "model.int8.onnx").run(None, {"inputs": x.numpy()})[0]
    assert got.shape == (6, 10)
    manifest = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert manifest["input"]["shape"] == ["batch", 1, 28, 28]
    assert manifest["quantization"]["val_examples"] > 0


def test_int8_export_of_gpt_scores_both_graphs_on_validation_windows(
    lm_run: Path, lm_onnx: tuple[Path, ExportResult]
) -> None:
    """A language model's quality under int8 is its validation loss; the fp32 graph's is the
    PyTorch model's own on the same windows."""
    from cadence.workloads import build_workload

    out, result = lm_onnx
    q = result.quantization
    assert q is not None and "val_accuracy_change" not in q
    run = load_run(lm_run)
    run.config.train.device = "cpu"
    blocks = build_workload(run.config).val_blocks(q["val_examples"]).cpu()
    with torch.no_grad():
        logits = run.model(blocks[:, :-1])
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten())
    assert abs(q["val_loss_fp32"] - float(ref)) < 1e-4
    assert q["val_loss_change"] == q["val_loss_int8"] - q["val_loss_fp32"]
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["kind"] == "lm" and manifest["input"]["name"] == "idx"


def test_hf_export_of_a_classifier_is_refused_naming_the_formats(
    digits_run: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="--format hf: the digits classifier has no hf form"):
        export_run(digits_run, "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantising_a_float64_model_is_refused(logreg_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a float32 model"):
        export_run(logreg_run, "onnx", tmp_path / "out", quantize="int8")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------- errors


def test_export_errors_name_the_problem(lm_run: Path, digits_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--ema needs a run trained with train.ema"):
        export_run(digits_run, "safetensors", tmp_path / "a", ema=True)
    with pytest.raises(ConfigError, match="--quantize int8: needs --format onnx"):
        export_run(lm_run, "safetensors", tmp_path / "b", quantize="int8")
    with pytest.raises(ConfigError, match="run directory not found"):
        export_run(tmp_path / "nope", "safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((digits_run / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="model.safetensors: not found"):
        load_run(broken)
    (broken / "config.yaml").write_text("workload: [unclosed\n")
    with pytest.raises(ConfigError, match="config.yaml"):
        load_run(broken)
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    cfg = cadence.load_config(None, ["workload=digits", "model.hidden=[7]", "schedule.warmup=0"])
    (mismatch / "config.yaml").write_text(dump_config(cfg))
    (mismatch / "model.safetensors").write_bytes((digits_run / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="does not match config.yaml"):
        load_run(mismatch)


# ---------------------------------------------------------------- commands


def test_generate_command_streams_text(lm_run: Path, capsys: pytest.CaptureFixture) -> None:
    args = _parse(
        "generate", str(lm_run), "--prompt", "def f(x):", "--max-new-tokens", "15", "--seed", "3"
    )
    assert args.func(args, Console(stderr=True)) == 0
    printed = capsys.readouterr().out
    run = load_run(lm_run)
    tokens = list(generate(run.model, list(b"def f(x):"), SamplingParams(15, 0.8, seed=3)))
    assert printed == "def f(x):" + run.tokenizer.decode(tokens) + "\n"


def test_generate_command_rejects_classifiers_and_bad_flags(digits_run: Path, lm_run: Path) -> None:
    args = _parse("generate", str(digits_run), "--prompt", "x")
    with pytest.raises(ConfigError, match="classifier cannot generate"):
        args.func(args, Console())
    args = _parse("generate", str(lm_run), "--prompt", "x", "--top-p", "2")
    with pytest.raises(ConfigError, match="^--top-p: must be in"):
        args.func(args, Console())


def test_export_command_prints_the_parity(digits_run: Path, tmp_path: Path) -> None:
    console = Console(record=True, width=200)
    args = _parse("export", str(digits_run), "--format", "onnx", "--out", str(tmp_path / "x"))
    assert args.func(args, console) == 0
    assert "max abs diff" in console.export_text()
