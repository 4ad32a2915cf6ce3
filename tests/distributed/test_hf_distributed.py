"""Hugging Face models on 2 CPU processes (gloo) against one: DDP, and FSDP2 per decoder layer.

The same contract as cadence's GPT (test_ddp_fsdp.py): per-step losses, gradient norms and the
final weights agree with the one-process run to float tolerance. Muon runs under FSDP2 too, so
the hidden matrices it orthogonalises are sharded ones gathered whole.
"""

from __future__ import annotations

import json

import pytest

from cli_helpers import as_sets
from hf_models import GPT2, LLAMA, hf_config_set

from .conftest import assert_same_rows, assert_same_weights, launch_here, rows, run_in_process

# batch.size=7 with micro_size=2: uneven shares (4/3), two micro-batches on each rank.
HF = [
    "workload=lm",
    "model.seq_len=16",
    "data.max_bytes=100000",
    "batch.size=7",
    "batch.micro_size=2",
    "schedule.warmup=2",
    "train.max_steps=6",
    "train.eval_every=3",
    "train.eval_samples=16",
    "train.threads=1",
    "train.progress=false",
    "train.log_every=1",
    "train.dist_timeout_s=60",
]

CASES = {
    "llama-ddp-adamw": (LLAMA, "ddp", "adamw"),
    "gpt2-ddp-sgd": (GPT2, "ddp", "sgd"),
    "llama-fsdp-muon": (LLAMA, "fsdp", "muon"),
    "gpt2-fsdp-adamw": (GPT2, "fsdp", "adamw"),
    # adapters (model.peft) under DDP. SGD: Adam divides by each entry's gradient, and LoRA's
    # A starts with a zero gradient (B = 0), where two processes' reduction order noise becomes
    # a visible step (2e-3 apart in grad_norm by step 5); the reduction itself is what is tested.
    "llama-ddp-lora": (LLAMA, "ddp", "sgd"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(tmp_path, case: str) -> None:
    spec, mode, opt = CASES[case]
    cfg = [*HF, hf_config_set(spec), f"train.distributed={mode}", f"optimizer.name={opt}"]
    if opt == "sgd":
        cfg += ["optimizer.lr=0.1", "optimizer.momentum=0.9"]
    if case.endswith("lora"):
        cfg += ["model.peft.method=lora", "model.peft.r=4", "optimizer.loraplus_ratio=4"]
    if opt == "muon":
        # A tenth of the default lr: Newton-Schulz in bf16 amplifies two processes' reduction
        # order noise in proportion to the step; at lr 0.02 a Llama o_proj differed by 4e-3
        # after 6 steps (AMD, 2026-12-03), chaos that says nothing about the sharding.
        cfg += ["optimizer.lr=0.002"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_in_process("train", *as_sets(cfg), "--run-dir", str(one))
    launch_here("train", *as_sets(cfg), "--run-dir", str(two), "--nproc", "2")
    # Muon: gradient norms 3.9e-4 (here, AMD) and 8.7e-4 (the CI machine) apart by step 6 at lr 0.02,
    # hence 2e-3 for Muon only.
    assert_same_rows(rows(two), rows(one), rtol=2e-3 if opt == "muon" else 1e-4)
    # Float noise in the gradient reduction is amplified by the update rule, and only there:
    # Adam divides by the gradient's own size (embedding rows of tokens the batches barely
    # contain) and Muon's Newton-Schulz runs in bf16 (torch's), where noise flips roundings
    # that the next iterations carry: cadence's own GPT under FSDP2 + Muon differs from one
    # process by up to 5e-4 after these 6 steps too. The sharded optimizers are bit-exact on
    # equal inputs (test_sharded_optimizers.py), and the per-step losses and gradient norms
    # above agree to 1e-4 (Muon: 2e-3); a real error (a wrong shard, a missing reduction) is far larger.
    # Muon: 1.02e-3 seen on 1 of 1,024 elements of a Llama matrix (2026-12-02), hence 2e-3.
    atol = {"sgd": 1e-6, "adamw": 5e-5, "muon": 2e-3}[opt]
    assert_same_weights(two / "model.safetensors", one / "model.safetensors", rtol=1e-4, atol=atol)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert s2["params"] == s1["params"]
    assert s2["trainable_params"] == s1["trainable_params"]
    if mode == "fsdp":  # one FSDP unit per decoder layer, and the checkpoint written sharded
        assert any((two / "checkpoints").glob("step_*/sharded"))


def test_chat_tuning_on_two_processes_matches_one(tmp_path) -> None:
    """The answers-only loss is divided by the counted tokens of the whole global batch (every
    rank counts them from the global batch's indices), so the ranks' shares, with unequal
    numbers of answer tokens, add up to the one-process step."""
    from transformers import AutoTokenizer

    from hf_models import save_model_dir

    folder = save_model_dir(tmp_path / "llama", LLAMA)
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = (
        "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
    )
    tok.save_pretrained(str(folder))
    data = tmp_path / "chat.jsonl"
    lines = []
    for i in range(30):  # answers of different lengths, so the shares count unequal tokens
        messages = [
            {"role": "user", "content": f"repeat {i}"},
            {"role": "assistant", "content": str(i) * (1 + i % 4)},
        ]
        lines.append(json.dumps({"messages": messages}))
    data.write_text("\n".join(lines) + "\n")
    cfg = [*HF, "model.seq_len=32", f"model.hf={folder}", "data.format=chat", f"data.path={data}"]
    cfg += ["model.peft.method=lora", "model.peft.r=4", "optimizer.name=sgd", "optimizer.lr=0.1"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_in_process("train", *as_sets(cfg), "--run-dir", str(one))
    launch_here("train", *as_sets(cfg), "--run-dir", str(two), "--nproc", "2")
    assert_same_rows(rows(two), rows(one), rtol=1e-4)
    assert_same_weights(two / "model.safetensors", one / "model.safetensors", rtol=1e-4, atol=1e-6)
