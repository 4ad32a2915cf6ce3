"""train.compile: when auto compiles, that compiling changes no result, and the eager fallback."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import cadence
from cadence.models import GPT, MLP, GPTConfig
from cadence.training import compiling

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "model.n_layer=2",
    "model.d_model=16",
    "model.n_head=2",
    "model.seq_len=16",
    "data.max_bytes=30000",
    "batch.size=4",
    "train.max_steps=4",
    "train.eval_every=4",
    "train.eval_samples=8",
    "train.log_every=1",
    "train.progress=false",
    # AdamW, not the default Muon: Muon's Newton-Schulz (bf16 on accelerators) turns the
    # ulp-level differences of compiled kernels into 4e-4 weight differences (seen on the CI
    # machine, 2026-12-02, when CPUs ran it in bf16 too), which says nothing about whether
    # compiling changed the math.
    "optimizer.name=adamw",
]


def _losses(run) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows]


def test_auto_compiles_transformers_on_long_runs_only(monkeypatch) -> None:
    monkeypatch.setattr(compiling, "_have_cxx", lambda: True)
    gpt = GPT(GPTConfig(vocab_size=256, seq_len=8, n_layer=1, n_head=2, d_model=16))
    mlp = MLP(64, [32], 10)
    cpu, n = torch.device("cpu"), compiling.AUTO_MIN_STEPS
    assert compiling.wants_compile("auto", gpt, cpu, n)
    assert not compiling.wants_compile("auto", gpt, cpu, n - 1)
    assert not compiling.wants_compile("auto", mlp, cpu, 10 * n)
    assert compiling.wants_compile(True, mlp, cpu, 1) and not compiling.wants_compile(
        False, gpt, cpu, n
    )
    monkeypatch.setattr(compiling, "_have_cxx", lambda: False)
    assert not compiling.wants_compile("auto", gpt, cpu, n)  # inductor could not build on CPU
    assert compiling.wants_compile("auto", gpt, torch.device("cuda"), n)


def _inspected(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "inspect.jsonl").read_text().splitlines()]


def test_compiled_run_matches_eager_and_keeps_the_weights_names(tmp_path) -> None:
    from safetensors.torch import load_file

    runs = {}
    for flag in ("false", "true"):
        # with per-layer health on: its hooks must run inside compiled blocks too
        cfg = cadence.load_config(None, [*TINY, f"train.compile={flag}", "train.inspect_every=2"])
        cadence.train(cfg, run_dir=tmp_path / flag, plots=False)
        runs[flag] = tmp_path / flag
    eager, compiled = _losses(runs["false"]), _losses(runs["true"])
    assert compiled == pytest.approx(eager, rel=1e-4)  # the same math, other kernels
    for want, got in zip(*(_inspected(runs[f]) for f in ("false", "true")), strict=True):
        assert want["layers"].keys() == got["layers"].keys()
        for layer, stats in want["layers"].items():
            assert "attn_entropy" in stats or not layer.startswith("blocks.")
            assert got["layers"][layer] == pytest.approx(stats, rel=1e-3, abs=1e-6)
    a = load_file(runs["false"] / "model.safetensors")
    b = load_file(runs["true"] / "model.safetensors")
    assert a.keys() == b.keys()  # per-block compile leaves the module tree and its names
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch) -> None:
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(compiling, "BACKEND", broken)
    cfg = cadence.load_config(None, [*TINY, "train.compile=true"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cadence.train(cfg, run_dir=tmp_path / "fallback", plots=False)
    ours = [w for w in caught if "train.compile" in str(w.message)]
    assert len(ours) == 1 and "training continues eager" in str(ours[0].message)
    cfg = cadence.load_config(None, [*TINY, "train.compile=false"])
    cadence.train(cfg, run_dir=tmp_path / "eager", plots=False)
    assert _losses(tmp_path / "fallback") == _losses(tmp_path / "eager")  # bitwise


def test_a_compiled_run_leaves_its_model_eager(tmp_path) -> None:
    """Blocks are compiled in place; the trainer undoes it when the run ends, so a model
    trained from Python is not silently compiled for whatever the caller does next."""
    from cadence.workloads import build_workload

    cfg = cadence.load_config(None, [*TINY, "train.compile=true"])
    workload = build_workload(cfg)
    seen = []

    class During(cadence.Callback):
        def on_step(self, trainer) -> None:
            seen.append(all(b._compiled_call_impl is not None for b in trainer.model.blocks))

    cadence.train(cfg, run_dir=tmp_path / "run", callbacks=[During()], workload=workload)
    assert seen and all(seen)
    assert all(b._compiled_call_impl is None for b in workload.model.blocks)
