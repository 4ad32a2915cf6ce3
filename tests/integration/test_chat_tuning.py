"""Chat tuning end to end: a local Llama with its own chat template, LoRA, conversations in
JSONL, the loss on the answers. Expectations come from a direct forward pass of the model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from resume_helpers import assert_same_run, kill_twice_then_resume, train_reference
from safetensors.torch import load_file

import cadence
from cadence.config import ConfigError
from cadence.data import DataError
from cadence.workloads import build_workload
from cadence.workloads.chat import IGNORE
from cli_helpers import as_sets
from hf_models import HF_RUN, LLAMA, save_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

# The folder's own template (other markers than cadence's default, so a test can tell which
# one rendered the data).
TEMPLATE = (
    "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ '<|eos|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    folder = save_model_dir(tmp_path_factory.mktemp("hf") / "llama", LLAMA)
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    lines = []
    for _ in range(40):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        messages = [
            {"role": "user", "content": f"{a} plus {b}?"},
            {"role": "assistant", "content": str(a + b)},
        ]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _overrides(folder: Path, data: Path, *extra: str) -> list[str]:
    return [
        *HF_RUN,
        f"model.hf={folder}",
        "data.format=chat",
        f"data.path={data}",
        "model.peft.method=lora",
        "model.peft.r=4",
        "optimizer.lr=0.01",
        *extra,
    ]


def test_the_loss_counts_the_answers_only(chat_llama, conversations):
    cfg = cadence.load_config(None, _overrides(chat_llama, conversations))
    w = build_workload(cfg)
    x, y = w.batch(torch.arange(4))
    logits = w.model(x).float()
    per_token = F.cross_entropy(
        logits.flatten(0, 1), y.flatten().clamp(min=0), reduction="none"
    ).view_as(y)
    counted = y != IGNORE
    # the answers: digits and the end marker, never the question
    text = w.extras["tokenizer"].decode(y[0][counted[0]].tolist())
    assert text.strip().removesuffix("<|eos|>").isdigit(), text
    loss = w.loss_sum(w.model, (x, y))
    assert float(loss) == pytest.approx(float(per_token[counted].sum()), rel=1e-5)
    assert w.units((x, y)) == int(counted.sum()) == w.batch_units(torch.arange(4))
    # targets that do not count change neither the loss nor the gradients
    grads = torch.autograd.grad(loss, [p for p in w.model.parameters() if p.requires_grad])
    y2 = torch.where(counted, y, torch.randint_like(y, 0, 50))
    all_counted = F.cross_entropy(logits.flatten(0, 1), y2.flatten(), reduction="sum")
    assert float(all_counted) != pytest.approx(float(loss), rel=1e-3)
    masked = torch.where(counted, y2, torch.full_like(y2, IGNORE))
    loss2 = w.loss_sum(w.model, (x, masked))
    grads2 = torch.autograd.grad(loss2, [p for p in w.model.parameters() if p.requires_grad])
    assert float(loss2) == float(loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))
    # loss_on: all counts the question too
    cfg_all = cadence.load_config(None, _overrides(chat_llama, conversations, "data.loss_on=all"))
    w_all = build_workload(cfg_all)
    assert w_all.batch_units(torch.arange(4)) > w.batch_units(torch.arange(4))


def test_lora_chat_run_keeps_the_base_and_the_template(tmp_path, chat_llama, conversations):
    run = tmp_path / "run"
    cfg = cadence.load_config(None, _overrides(chat_llama, conversations, "train.max_steps=6"))
    summary = cadence.train(cfg, run_dir=run, plots=False)
    assert (run / "chat_template.jinja").read_text() == TEMPLATE
    saved = load_file(run / "model.safetensors")
    base = load_file(chat_llama / "model.safetensors")
    for k, v in saved.items():
        if ".lora_" not in k:
            assert torch.equal(v, base[k.removeprefix("hf.").replace(".base_layer", "")]), k
    assert summary["trainable_params"] < summary["params"]
    assert summary["metric"] == "val_loss" and summary["final_metrics"]["val_loss"] > 0
    # the template travels with the merged model and with the adapters alone
    from cadence.deploy.export import export_run

    for fmt in ("hf", "peft"):
        result = export_run(run, fmt, out=tmp_path / fmt)
        assert result.max_abs_diff <= result.tolerance
        assert (tmp_path / fmt / "chat_template.jinja").read_text() == TEMPLATE


def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(tmp_path, chat_llama, conversations):
    args = _overrides(chat_llama, conversations, "train.max_steps=16", "train.checkpoint_every=3")
    train_reference(args, tmp_path / "straight")
    cmd = ["train", *as_sets(args), "--run-dir", str(tmp_path / "run")]
    kill_twice_then_resume(cmd, tmp_path / "run", seed=11)
    assert_same_run(tmp_path / "straight", tmp_path / "run", range(1, 17))


def test_bad_chat_input_is_one_clear_error(tmp_path, chat_llama, conversations):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(conversations.read_text().splitlines()[0] + "\n{oops\n")
    with pytest.raises(DataError, match=f"{bad}:2: not a JSON object"):
        build_workload(cadence.load_config(None, _overrides(chat_llama, bad)))
    text = tmp_path / "x.txt"
    text.write_text("plain text\n")
    with pytest.raises(ConfigError, match="data.path: data.format chat reads a .jsonl"):
        cadence.load_config(None, _overrides(chat_llama, text))
    plain = save_model_dir(tmp_path / "plain", LLAMA)  # no chat template in its tokenizer files
    with pytest.raises(DataError, match="has no chat_template"):
        build_workload(cadence.load_config(None, _overrides(plain, conversations)))
