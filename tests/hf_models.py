"""Tiny Hugging Face causal LMs for the tests, built with from_config and save_pretrained.

Nothing downloads: the configs are written out here, the weights are a seeded fresh init, and
the Llama folder gets a small byte-level BPE tokenizer (with an end-of-sequence token) trained
on a few kilobytes of the installed sympy sources.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Small enough that a step takes milliseconds; two layers so "per decoder layer" means something.
LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
# GPT-2 with dropout off: its default 0.1 would make the comparisons below depend on RNG use.
GPT2: dict[str, Any] = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
SPECS = {"llama": LLAMA, "gpt2": GPT2}

# The lm workload at the size of these models.
HF_RUN = [
    "workload=lm",
    "model.seq_len=32",
    "data.max_bytes=100000",
    "batch.size=8",
    "schedule.warmup=2",
    "train.eval_samples=16",
    "train.eval_every=1000",
    "train.threads=1",
    "train.progress=false",
    "train.log_every=1",
]


def hf_config_set(spec: dict[str, Any]) -> str:
    """``model.hf_config=...`` for --set (YAML reads the JSON mapping)."""
    return f"model.hf_config={json.dumps(spec)}"


def _tokenizer(vocab_size: int) -> Any:
    import sympy
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (Path(sympy.__file__).parent / "core" / "basic.py").read_text()[:20000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


def save_model_dir(
    path: Path,
    spec: dict[str, Any],
    *,
    vocab_size: int = 300,
    tokenizer: bool = True,
    seed: int = 0,
) -> Path:
    """A folder as ``save_pretrained`` writes it: config, weights and (optionally) tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in spec.items() if k != "model_type"}
    tok = _tokenizer(vocab_size) if tokenizer else None
    if tok is not None:
        vocab_size = len(tok)
        kwargs["eos_token_id"] = tok.convert_tokens_to_ids("<|eos|>")
    else:
        kwargs.update(bos_token_id=None, eos_token_id=None)
    config = AutoConfig.for_model(spec["model_type"], vocab_size=vocab_size, **kwargs)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    if tok is not None:
        tok.save_pretrained(str(path))
    return path
