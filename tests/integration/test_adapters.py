"""Adapters (`model.peft`, built by peft) on a local Hugging Face Llama and on cadence's GPT.

Every expectation is derived: the base weights from the model folder, the adapter sizes from
the adapted layers' shapes, the first loss from the base model itself (B starts at zero, so the
adapted model computes the base function), the merged model from the unmerged one's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from resume_helpers import TINY_LM, assert_same_run, kill_twice_then_resume, train_reference
from safetensors.torch import load_file
from torch import nn

import cadence
from cadence.cli import main
from cadence.config import ConfigError
from cadence.config.parts import optimizer_from
from cadence.data import EpochSampler
from cadence.deploy.rundir import load_run
from cadence.optim import OPTIMIZERS
from cadence.optim.group_lr import inner_optimizers
from cadence.optim.groups import muon_split
from cadence.workloads import build_workload
from cli_helpers import as_sets
from hf_models import HF_RUN, LLAMA, save_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = ["model.peft.method=lora", "model.peft.r=4", "model.peft.alpha=8"]

TINY_GPT = [*TINY_LM, "train.eval_every=1000", "train.log_every=1"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("hf") / "llama", LLAMA)


def _train(run_dir: Path, overrides: list[str]) -> dict:
    return cadence.train(cadence.load_config(None, overrides), run_dir=run_dir, plots=False)


def _base_name(name: str) -> str:
    """A saved parameter's name in the model folder (no wrapper prefix, no peft part)."""
    return name.removeprefix("hf.").replace(".base_layer", "")


def test_lora_on_a_local_llama_trains_only_the_adapters(tmp_path, llama_dir):
    run = tmp_path / "run"
    summary = _train(run, [*HF_RUN, f"model.hf={llama_dir}", *LORA, "train.max_steps=8"])
    saved = load_file(run / "model.safetensors")
    base = load_file(llama_dir / "model.safetensors")
    adapters = {k: v for k, v in saved.items() if ".lora_" in k}
    frozen = {k: v for k, v in saved.items() if ".lora_" not in k}
    # every base tensor is in the run, bitwise as the folder has it
    assert {_base_name(k) for k in frozen} == set(base)
    assert all(torch.equal(v, base[_base_name(k)]) for k, v in frozen.items())
    # all-linear: every linear layer of the decoder, the head left out
    cfg = json.loads((llama_dir / "config.json").read_text())
    per_layer = 7  # q, k, v, o, gate, up, down
    assert len(adapters) == 2 * per_layer * cfg["num_hidden_layers"]
    assert not any("lm_head" in k for k in adapters)
    # A is r x in, B is out x r; B moved off zero
    assert all(v.shape[0] == 4 for k, v in adapters.items() if ".lora_A." in k)
    assert all(v.shape[1] == 4 for k, v in adapters.items() if ".lora_B." in k)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if ".lora_B." in k)
    # the summary counts both, from the tensors themselves
    assert summary["trainable_params"] == sum(v.numel() for v in adapters.values())
    assert summary["params"] == summary["trainable_params"] + sum(v.numel() for v in base.values())


def test_the_first_loss_is_the_base_models(tmp_path, llama_dir):
    """B starts at zero: before its first update the adapted model is the base model."""
    overrides = [*HF_RUN, f"model.hf={llama_dir}", "train.max_steps=1", "schedule.warmup=0"]
    plain = build_workload(cadence.load_config(None, overrides))
    batch = plain.batch(EpochSampler(plain.n_train, 0).indices(0, 8))
    with torch.no_grad():
        expected = float(plain.loss_sum(plain.model, batch)) / plain.units(batch)
    run = tmp_path / "run"
    _train(run, [*overrides, *LORA])
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train_loss"] == pytest.approx(expected, rel=1e-5)


def test_loraplus_gives_b_its_multiple_of_the_lr(llama_dir):
    cfg = cadence.load_config(
        None, [*HF_RUN, f"model.hf={llama_dir}", *LORA, "optimizer.loraplus_ratio=16"]
    )
    w = build_workload(cfg)
    opt = optimizer_from(cfg, w.model)
    names = {id(p): n for n, p in w.model.named_parameters()}
    lr_of = {
        names[id(p)]: g["lr"]
        for o in inner_optimizers(opt)
        for g in o.param_groups
        for p in g["params"]
    }
    assert set(lr_of) == {n for n, p in w.model.named_parameters() if p.requires_grad}
    for name, lr in lr_of.items():
        want = cfg.optimizer.lr * (16 if ".lora_B." in name else 1)
        assert lr == pytest.approx(want), name


def test_muon_orthogonalises_the_adapter_matrices_and_no_frozen_weight(llama_dir):
    cfg = cadence.load_config(
        None, [*HF_RUN, f"model.hf={llama_dir}", *LORA, "optimizer.name=muon"]
    )
    w = build_workload(cfg)
    muon, adamw = muon_split(w.model)
    names = {id(p): n for n, p in w.model.named_parameters()}
    trainable = {n for n, p in w.model.named_parameters() if p.requires_grad}
    assert {names[id(p)] for p in muon} == trainable  # A and B: every trainable is a matrix
    assert not adamw


def test_rslora_and_dora_are_peft_s(llama_dir):
    from peft.tuners.lora import LoraLayer

    for extra, scale in ((["model.peft.rslora=true"], 8 / 4**0.5), ([], 8 / 4)):
        cfg = cadence.load_config(None, [*HF_RUN, f"model.hf={llama_dir}", *LORA, *extra])
        layers = [m for m in build_workload(cfg).model.modules() if isinstance(m, LoraLayer)]
        assert layers and all(m.scaling["default"] == pytest.approx(scale) for m in layers)
    cfg = cadence.load_config(
        None, [*HF_RUN, f"model.hf={llama_dir}", *LORA, "model.peft.method=dora"]
    )
    model = build_workload(cfg).model
    magnitudes = [n for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes and all(
        p.requires_grad for n, p in model.named_parameters() if n in magnitudes
    )


def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(tmp_path, llama_dir):
    args = [
        *HF_RUN,
        f"model.hf={llama_dir}",
        *LORA,
        "train.max_steps=20",
        "train.checkpoint_every=3",
    ]
    train_reference(args, tmp_path / "straight")
    kill_twice_then_resume(
        ["train", *as_sets(args), "--run-dir", str(tmp_path / "run")], tmp_path / "run", seed=5
    )
    assert_same_run(tmp_path / "straight", tmp_path / "run", range(1, 21))


def test_a_loaded_run_is_the_merged_model_with_the_same_logits(tmp_path, llama_dir):
    run = tmp_path / "run"
    overrides = [*HF_RUN, f"model.hf={llama_dir}", *LORA, "train.max_steps=6", "optimizer.lr=0.02"]
    _train(run, overrides)
    # the unmerged reference: the adapted model with the run's weights
    w = build_workload(cadence.load_config(run / "config.yaml"), tokenizer_dir=run)
    from safetensors.torch import load_model

    load_model(w.model, str(run / "model.safetensors"), strict=True)
    w.model.eval()
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        want = w.model(ids)
        loaded = load_run(run)
        got = loaded.model(ids)
    assert not any(".lora_" in n or "base_layer" in n for n, _ in loaded.model.named_parameters())
    assert set(dict(loaded.model.named_parameters())) == {
        k for k in ("hf." + n for n in load_file(llama_dir / "model.safetensors"))
    } | {n for n, _ in loaded.model.named_parameters() if n.endswith("lm_head.weight")}
    assert (got - want).abs().max().item() <= 1e-4


def test_the_gpt_takes_adapters_on_its_hidden_layers(tmp_path):
    run = tmp_path / "run"
    summary = _train(run, [*TINY_GPT, *LORA, "train.max_steps=4"])
    saved = load_file(run / "model.safetensors")
    adapted = sorted({k.split(".lora_")[0] for k in saved if ".lora_" in k})
    assert adapted == [
        "blocks.0.attn.proj",
        "blocks.0.attn.qkv",
        "blocks.0.mlp.fc",
        "blocks.0.mlp.proj",
    ]
    assert summary["trainable_params"] == sum(v.numel() for k, v in saved.items() if ".lora_" in k)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_trains_the_adapters_and_leaves_the_base(tmp_path, name):
    lr = "1.0" if OPTIMIZERS[name].lr_free else "0.01"
    steps = [] if name != "gd" else ["batch.size=full"]
    cfg = cadence.load_config(
        None, [*TINY_GPT, *LORA, f"optimizer.name={name}", f"optimizer.lr={lr}", *steps]
    )
    w = build_workload(cfg)
    before = {n: p.detach().clone() for n, p in w.model.named_parameters()}
    opt = optimizer_from(cfg, w.model)
    held = {id(p) for o in inner_optimizers(opt) for g in o.param_groups for p in g["params"]}
    assert held == {id(p) for p in w.model.parameters() if p.requires_grad}
    batch = w.batch(EpochSampler(w.n_train, 0).indices(0, 4))
    for _ in range(2):
        opt.zero_grad()
        loss = w.loss_sum(w.model, batch) / w.units(batch)
        loss.backward()
        opt.step()
    after = dict(w.model.named_parameters())
    for n, p in after.items():
        if ".lora_" in n:
            continue
        assert torch.equal(p, before[n]), f"{name} moved the frozen {n}"
    assert any(not torch.equal(after[n], before[n]) for n in after if ".lora_B." in n), name


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.peft.r=0"], "model.peft.r"),
        (["model.peft.alpha=-1"], "model.peft.alpha"),
        (["model.peft.dropout=1"], "model.peft.dropout"),
        (["model.peft.target_modules=[nosuch]"], "model.peft.target_modules"),
        (["model.peft.target_modules=[head]"], "model.peft.target_modules"),
        (["model.freeze=[tok_emb.*]"], "model.freeze"),
        (["optimizer.body_lr_ratio=0.1"], "optimizer.body_lr_ratio"),
        (["train.distributed=fsdp"], "train.distributed"),
        (["model.parametrization=mup", "optimizer.name=adamw"], "model.parametrization"),
        (["optimizer.loraplus_ratio=0.5"], "optimizer.loraplus_ratio"),
        (["model.peft.method=none", "optimizer.loraplus_ratio=16"], "optimizer.loraplus_ratio"),
    ],
)
def test_bad_adapter_settings_are_one_line_naming_the_key(tmp_path, capsys, overrides, key):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            *as_sets([*TINY_GPT, *LORA, *overrides, "train.max_steps=3"]),
            "--run-dir",
            str(run),
        ]
    )
    err = capsys.readouterr().err
    # (a first run may also say that it prepares the corpus; the error is one line of its own)
    lines = [line for line in err.splitlines() if line.strip() and "preparing" not in line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"cadence: error: {key}"), lines
    assert not run.exists()


def test_config_error_type_for_python_callers():
    with pytest.raises(ConfigError, match="model.peft.r"):
        cadence.load_config(None, [*TINY_GPT, *LORA, "model.peft.r=-2"])


def test_adapted_layers_are_peft_s_own(llama_dir):
    from peft.tuners.lora import LoraLayer

    cfg = cadence.load_config(None, [*HF_RUN, f"model.hf={llama_dir}", *LORA])
    model = build_workload(cfg).model
    linears = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert linears and all(
        isinstance(model.get_submodule(n).get_base_layer(), nn.Linear) for n in linears
    )


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, llama_dir) -> Path:
    run = tmp_path_factory.mktemp("lora") / "run"
    _train(run, [*HF_RUN, f"model.hf={llama_dir}", *LORA, "train.max_steps=6", "optimizer.lr=0.02"])
    return run


def _unmerged_logits(run: Path, ids: torch.Tensor) -> torch.Tensor:
    """The run's model as it trained: adapters beside the frozen base."""
    from safetensors.torch import load_model

    w = build_workload(cadence.load_config(run / "config.yaml"), tokenizer_dir=run)
    load_model(w.model, str(run / "model.safetensors"), strict=True)
    w.model.eval()
    with torch.no_grad():
        return w.model(ids).float()


def test_the_peft_export_loads_onto_the_untouched_base(lora_run, llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cadence.deploy.export import export_run

    result = export_run(lora_run, "peft", out=tmp_path / "adapter")
    assert result.max_abs_diff <= result.tolerance
    ids = torch.randint(0, 200, (2, 12))
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(input_ids=ids).logits.float()
        model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        adapted = model(input_ids=ids).logits.float()
    want = _unmerged_logits(lora_run, ids)
    assert (adapted - want).abs().max().item() <= 1e-4
    assert (plain - want).abs().max().item() > 1e-3  # the adapters changed the function
    assert (tmp_path / "adapter" / "tokenizer.json").is_file()


def test_the_hf_and_safetensors_exports_hold_the_merged_model(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from cadence.deploy.export import export_run

    export_run(lora_run, "hf", out=tmp_path / "hf")
    ids = torch.randint(0, 200, (2, 12))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits.float()
    assert (got - _unmerged_logits(lora_run, ids)).abs().max().item() <= 1e-4
    result = export_run(lora_run, "safetensors", out=tmp_path / "st")
    assert result.max_abs_diff == 0.0
    saved = cadence.load_config(tmp_path / "st" / "config.yaml")
    assert saved.model.peft.method == "none"  # the export is the plain, merged model
    assert not any(".lora_" in k for k in load_file(tmp_path / "st" / "model.safetensors"))


def test_a_peft_export_of_a_run_without_adapters_or_of_the_gpt_is_refused(tmp_path):
    from cadence.deploy.export import export_run

    gpt = tmp_path / "gpt"
    _train(gpt, [*TINY_GPT, *LORA, "train.max_steps=3"])
    with pytest.raises(ConfigError, match="--format peft: the adapters load onto"):
        export_run(gpt, "peft", out=tmp_path / "out")
    plain = tmp_path / "plain"
    _train(plain, [*TINY_GPT, "train.max_steps=3"])
    with pytest.raises(ConfigError, match="this run trained none"):
        export_run(plain, "peft", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_find_lr_and_tune_run_on_an_adapter_config(tmp_path):
    import yaml

    sets = as_sets([*TINY_GPT, *LORA, "train.max_steps=6"])
    assert main(["find-lr", *sets, "--steps", "20", "--out", str(tmp_path / "fl")]) == 0
    found = json.loads((tmp_path / "fl" / "lr_find.json").read_text())
    assert found["suggestion"] > 0
    config = {
        "workload": "lm",
        "model": {
            "n_layer": 1,
            "d_model": 32,
            "n_head": 2,
            "seq_len": 16,
            "peft": {"method": "lora", "r": 4},
        },
        "data": {"max_bytes": 100000},
        "batch": {"size": 4},
        "train": {"max_steps": 6, "eval_every": 3, "eval_samples": 8, "progress": False},
        "search": {"optimizer.lr": {"low": 1e-3, "high": 0.1, "log": True}},
    }
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "tu"
    assert main(["tune", str(tmp_path / "tune.yaml"), "--trials", "2", "--run-dir", str(run)]) == 0
    best = cadence.load_config(run / "best.yaml")
    assert best.model.peft.method == "lora" and 1e-3 <= best.optimizer.lr <= 0.1
