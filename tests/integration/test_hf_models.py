"""Hugging Face causal LMs through cadence: a tiny Llama and a tiny GPT-2, built offline.

Each test derives what it expects from the model itself: the loss at initialisation, the
parameter roles from the module types, the loss of the loaded weights on the first batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from resume_helpers import assert_same_run, kill_twice_then_resume, train_reference
from safetensors.torch import load_file
from torch import nn

import cadence
from cadence.config import ConfigError
from cadence.data import EpochSampler
from cadence.deploy.export import export_run
from cadence.deploy.rundir import load_run
from cadence.models.generate import SamplingParams, generate, generate_batch
from cadence.models.hf import HFCausalLM
from cadence.optim.groups import muon_split
from cadence.workloads import build_workload
from cli_helpers import as_sets
from hf_models import GPT2, HF_RUN, LLAMA, SPECS, hf_config_set, save_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A saved Llama with its own tokenizer (300 tokens, an <|eos|> among them)."""
    return save_model_dir(tmp_path_factory.mktemp("hf") / "llama", LLAMA)


def train(tmp_path: Path, *overrides: str, name: str = "run") -> Path:
    cfg = cadence.load_config(None, [*HF_RUN, *overrides])
    cadence.train(cfg, run_dir=tmp_path / name, plots=False)
    return tmp_path / name


def logged(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


OPTIMIZERS = {
    "adamw": ["optimizer.name=adamw", "optimizer.lr=3e-3"],
    "muon": ["optimizer.name=muon", "optimizer.lr=3e-3"],
    "sgd+momentum": ["optimizer.name=sgd", "optimizer.lr=0.3", "optimizer.momentum=0.9"],
}


@pytest.mark.parametrize("arch", list(SPECS))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_the_loss_falls_for_every_kind_of_optimizer(tmp_path, arch, opt):
    run = train(tmp_path, hf_config_set(SPECS[arch]), *OPTIMIZERS[opt], "train.max_steps=30")
    losses = [r["train_loss"] for r in logged(run)]
    # A fresh model predicts ~uniformly over the byte vocabulary: its loss is near ln(256).
    assert losses[0] == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.3)
    # Learning the byte frequencies of source code alone takes it far below that.
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def _hidden_matrices(model: HFCausalLM) -> set[str]:
    """Reference: 2-D Linear/Conv1D weights inside the decoder layers, by module type."""
    from transformers.pytorch_utils import Conv1D

    names = set()
    for block_name, block in model.named_modules():
        if block in model.blocks:
            for name, m in block.named_modules():
                if isinstance(m, (nn.Linear, Conv1D)):
                    names.add(f"{block_name}.{name}.weight")
    return names


@pytest.mark.parametrize("arch", list(SPECS))
def test_muon_takes_the_hidden_matrices_and_leaves_embeddings_and_head_to_adamw(arch):
    from cadence.models.hf import hf_config_from_dict

    model = HFCausalLM.from_config(hf_config_from_dict(SPECS[arch], 256))
    names = {id(p): n for n, p in model.named_parameters()}
    matrices, rest = muon_split(model)
    assert {names[id(p)] for p in matrices} == _hidden_matrices(model)
    rest_names = {names[id(p)] for p in rest}
    emb = model.hf.get_input_embeddings().weight
    head = model.hf.get_output_embeddings().weight
    # 2-D, yet AdamW's: the token table (tied to the head in GPT-2) and the head.
    assert names[id(emb)] in rest_names and names.get(id(head), names[id(emb)]) in rest_names
    assert all(p.ndim == 2 for p in matrices)


@pytest.mark.parametrize("arch", list(SPECS))
def test_accumulation_equals_one_large_batch(tmp_path, arch):
    # SGD: its update is linear in the gradient, so float noise in the summed micro-batch
    # gradients stays noise (Adam divides a near-zero gradient by its own size).
    common = [hf_config_set(SPECS[arch]), "optimizer.name=sgd", "optimizer.lr=0.3"]
    common += ["optimizer.momentum=0.9", "train.max_steps=3"]
    whole = train(tmp_path, *common, name="whole")
    micro = train(tmp_path, *common, "batch.micro_size=2", name="micro")
    a, b = load_file(whole / "model.safetensors"), load_file(micro / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_sigkill_then_resume_gives_bitwise_the_uninterrupted_weights(tmp_path, llama_dir):
    args = [*HF_RUN, f"model.hf={llama_dir}", "optimizer.name=muon", "train.max_steps=24"]
    args += ["train.checkpoint_every=3"]
    train_reference(args, tmp_path / "straight")
    cmd = ["train", *as_sets(args), "--run-dir", str(tmp_path / "run")]
    kill_twice_then_resume(cmd, tmp_path / "run", seed=3)
    assert_same_run(tmp_path / "straight", tmp_path / "run", range(1, 25))


def test_fine_tuning_starts_from_the_saved_weights(tmp_path, llama_dir):
    import json as json_module

    corpus = tmp_path / "corpus"  # a different corpus: the json package's sources
    corpus.mkdir()
    for src in Path(json_module.__file__).parent.glob("*.py"):
        (corpus / src.name).write_text(src.read_text())
    overrides = [f"model.hf={llama_dir}", f"data.path={corpus}", "train.max_steps=1"]
    overrides += ["schedule.warmup=0"]
    run = train(tmp_path, *overrides)
    # The run used the folder's own tokenizer (its end-of-sequence token included).
    assert json.loads((run / "tokenizer_config.json").read_text())["eos_token"] == "<|eos|>"
    cfg = cadence.load_config(run / "config.yaml")
    w = build_workload(cfg)  # its model is the folder's, loaded again
    batch = w.batch(EpochSampler(w.n_train, cfg.train.seed).indices(0, 8))
    with torch.no_grad():
        expected = float(w.loss_sum(w.model, batch)) / w.units(batch)
    assert logged(run)[0]["train_loss"] == pytest.approx(expected, rel=1e-5)


def test_freeze_and_a_lower_body_lr(tmp_path, llama_dir):
    run = train(
        tmp_path,
        f"model.hf={llama_dir}",
        "model.freeze=[model.embed_tokens.*, model.layers.0.*]",
        "optimizer.body_lr_ratio=0.1",
        "train.max_steps=3",
    )
    before = {f"hf.{k}": v for k, v in load_file(llama_dir / "model.safetensors").items()}
    after = load_file(run / "model.safetensors")
    frozen = [k for k in after if ".embed_tokens." in k or ".layers.0." in k]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert not torch.equal(after["hf.model.layers.1.mlp.up_proj.weight"], before[
        "hf.model.layers.1.mlp.up_proj.weight"])  # fmt: skip
    row = logged(run)[-1]
    cfg = cadence.load_config(run / "config.yaml")
    assert cfg.optimizer.body_lr_ratio == 0.1 and row["lr"] > 0


def test_a_bad_freeze_pattern_and_a_vocabulary_too_small_are_refused(tmp_path, llama_dir):
    with pytest.raises(ConfigError, match=r"model.freeze: pattern 'nope\*' matches no parameter"):
        train(tmp_path, f"model.hf={llama_dir}", "model.freeze=[nope*]", "train.max_steps=3")
    small = save_model_dir(tmp_path / "small", GPT2, vocab_size=100, tokenizer=False)
    with pytest.raises(ConfigError, match="the tokenizer has 256 tokens but the model's vocab"):
        train(tmp_path, f"model.hf={small}", "train.max_steps=3")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arch", list(SPECS))
def test_export_hf_loads_with_from_pretrained_and_gives_identical_logits(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = train(tmp_path, hf_config_set(SPECS[arch]), "train.max_steps=3")
    result = export_run(run, "hf", out=tmp_path / "hf")
    assert result.max_abs_diff <= result.tolerance
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    ours = load_run(run).model
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits.float(), ours(x))
    text = "def f(x):\n    return x  # é"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] == list(
        load_run(run).tokenizer.encode(text)
    )


@pytest.mark.parametrize("parametrization", ["sp", "mup"])
def test_cadence_gpt_exports_as_gpt_neox_when_it_uses_layernorm(tmp_path, parametrization):
    from transformers import AutoModelForCausalLM

    gpt = ["model.n_layer=2", "model.d_model=32", "model.n_head=4", "train.max_steps=3"]
    # μP at twice its base width: its logit and attention multipliers are baked into the weights
    mup = [f"model.parametrization={parametrization}", "model.base_width=16"]
    run = train(tmp_path, *gpt, *mup, "model.norm=layernorm")
    export_run(run, "hf", out=tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert type(loaded).__name__ == "GPTNeoXForCausalLM"
    x = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, load_run(run).model(x))
    rms = train(tmp_path, *gpt, name="rms")
    with pytest.raises(ConfigError, match="model.norm=rmsnorm has no equivalent Hugging Face"):
        export_run(rms, "hf", out=tmp_path / "rms_hf")
    assert not (tmp_path / "rms_hf").exists()


@pytest.mark.parametrize("arch", list(SPECS))
def test_generation_with_the_cache_and_in_batches_matches_the_plain_forward(tmp_path, arch):
    model = load_run(train(tmp_path, hf_config_set(SPECS[arch]), "train.max_steps=3")).model
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    cached = [list(generate(model, p, greedy)) for p in prompts]
    plain = [list(generate(model, p, greedy, use_cache=False)) for p in prompts]
    batched = list(generate_batch(model, prompts, [greedy, greedy]))
    assert cached == plain
    assert [[step[i] for step in batched] for i in range(2)] == cached


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    from cadence.models.hf import hf_config_from_dict

    torch.manual_seed(0)
    model = HFCausalLM.from_config(hf_config_from_dict(LLAMA, 256)).train()
    x = torch.randint(0, 256, (2, 16))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_activation_checkpointing(True)
    recomputed = grads()
    for k in plain:
        torch.testing.assert_close(recomputed[k], plain[k], rtol=1e-5, atol=1e-7)


def test_the_summary_reports_parameters_and_flops_for_hf_models(tmp_path):
    run = train(tmp_path, hf_config_set(LLAMA), "train.max_steps=3")
    summary = json.loads((run / "summary.json").read_text())
    model = load_run(run).model
    assert summary["params"] == model.num_params()
    assert summary["flops_per_token"] == model.flops_per_token()


def test_an_hf_run_serves_openai_completions_that_end_at_its_eos(tmp_path, llama_dir):
    import openai
    from serve_helpers import serve

    run = load_run(train(tmp_path, f"model.hf={llama_dir}", "train.max_steps=30"))
    prompt = "def f(x):"
    ids = [int(t) for t in run.tokenizer.encode(prompt)]
    greedy = list(generate(run.model, ids, SamplingParams(max_new_tokens=12, temperature=0.0)))
    # The folder's own <|eos|> token; a 30-step model rarely writes it, so the test makes the
    # first token the greedy text writes for the first time after 3 others (else its first) EOS.
    assert run.tokenizer.decode([run.tokenizer.eos_token_id]) == "<|eos|>"
    k = next((i for i in range(3, len(greedy)) if greedy[i] not in greedy[:i]), 0)
    run.tokenizer.eos_token_id = greedy[k]
    for server in serve(run, 64):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        out = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == run.tokenizer.decode(greedy[:k])
        assert out.choices[0].finish_reason == "stop"
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), k + 1)


def test_bf16_autocast_trains_an_hf_model(tmp_path):
    run = train(tmp_path, hf_config_set(LLAMA), "train.precision=bf16", "train.max_steps=30")
    losses = [r["train_loss"] for r in logged(run)]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-5:]) / 5 < losses[0] - 1.0
    # The weights stay fp32 (autocast computes in bf16); the export is an ordinary fp32 model.
    assert {v.dtype for v in load_file(run / "model.safetensors").values()} == {torch.float32}
