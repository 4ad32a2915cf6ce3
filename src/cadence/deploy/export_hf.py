"""Export to the Hugging Face format: a folder ``AutoModelForCausalLM.from_pretrained`` loads.

Which runs can go there:

- a Hugging Face model trained by cadence (``model.hf`` / ``model.hf_config``): written by its
  own ``save_pretrained``, so the architecture is the one it was trained as;
- cadence's GPT with ``model.norm: layernorm``: it is a GPT-NeoX (pre-norm blocks, rotary
  embeddings over the whole head on (first half, second half) pairs, a GELU MLP, LayerNorm),
  with the biases NeoX has and cadence's GPT does not set to zero and the fused QKV matrix
  reordered to NeoX's per-head layout;
- cadence's GPT with ``model.norm: rmsnorm`` (the default) has no HF equivalent: the RMSNorm
  models in transformers (Llama, Mistral, Qwen...) all use a gated MLP, so it is refused with a
  line saying so.

The tokenizer goes along in the ``tokenizers`` format with a ``tokenizer_config.json``, so
``AutoTokenizer`` loads it too; cadence's byte tokenizer becomes a byte-level BPE without merges
that gives the same ids. The export is then loaded back with ``from_pretrained`` and its logits
compared with the run's model before anything is moved into place.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from cadence.config import ConfigError
from cadence.deploy.rundir import LoadedRun

__all__ = ["HF_TOLERANCE", "export_hf"]

# |HF - cadence| on the logits. An HF model exported by its own save_pretrained runs the same
# code on the same weights (bit-identical); cadence's GPT as GPT-NeoX differs in kernel order
# only (rotary tables, fused vs split attention inputs): ~1e-6 on these models.
HF_TOLERANCE = 1e-4


def byte_tokenizer_json() -> str:
    """cadence's byte tokenizer (id = byte value) as a ``tokenizers`` byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # GPT-2's byte-to-unicode table, as the ByteLevel pre-tokenizer applies it.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def _write_tokenizer(run: LoadedRun, out: Path) -> list[str]:
    from cadence.data import ByteTokenizer, PretrainedTokenizer

    tok = run.tokenizer
    if isinstance(tok, PretrainedTokenizer):
        tok.save(out)
        return ["tokenizer.json", *tok.files]
    if isinstance(tok, ByteTokenizer):
        (out / "tokenizer.json").write_text(byte_tokenizer_json())
    else:
        tok.save(out)  # type: ignore[union-attr] - a BPETokenizer is already this format
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": run.seq_len}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]


def _gpt_as_neox(run: LoadedRun) -> Any:
    """cadence's GPT (layernorm) as an equivalent ``GPTNeoXForCausalLM``, weights copied."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from cadence.models.hf import _quiet_transformers

    gpt = run.model
    c = gpt.config
    if c.norm != "layernorm":
        raise ConfigError(
            f"--format hf: cadence's GPT with model.norm={c.norm} has no equivalent Hugging "
            "Face architecture (its RMSNorm models all use a gated MLP); train with "
            "model.norm=layernorm to export it as GPT-NeoX, or use --format safetensors|onnx"
        )
    _quiet_transformers()
    hd = c.d_model // c.n_head
    config = GPTNeoXConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        intermediate_size=c.mlp_ratio * c.d_model,
        hidden_act="gelu",
        max_position_embeddings=c.seq_len,
        layer_norm_eps=gpt.norm_f.eps,
        use_parallel_residual=False,
        tie_word_embeddings=c.tie_embeddings,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(c.rope_base),
            "partial_rotary_factor": 1.0,
        },
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    neox = GPTNeoXForCausalLM(config).eval()
    own = gpt.state_dict()
    # μP's two multipliers are baked into weights, as NeoX has neither: the 1/m on the logits
    # into the final norm's (the head is linear in its output; a tied embedding stays shared),
    # and the attention's extra 1/sqrt(m) on the scores into the query rows (RoPE is linear).
    m = c.width_mult
    new: dict[str, torch.Tensor] = {
        "gpt_neox.embed_in.weight": own["tok_emb.weight"],
        "gpt_neox.final_layer_norm.weight": own["norm_f.weight"] / m,
        "gpt_neox.final_layer_norm.bias": own["norm_f.bias"] / m,
    }
    head = next(n for n, m in neox.named_modules() if m is neox.get_output_embeddings())
    new[f"{head}.weight"] = own["head.weight"]
    for i in range(c.n_layer):
        src, dst = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        q, k, v = own[src + "attn.qkv.weight"].split(c.d_model, dim=0)
        q = q / math.sqrt(m)
        # cadence: [Q | K | V], head h at rows h*hd of each; NeoX: per head, [q_h, k_h, v_h].
        per_head = [t.view(c.n_head, hd, c.d_model) for t in (q, k, v)]
        qkv = torch.cat(per_head, dim=1).reshape(3 * c.d_model, c.d_model)
        pairs = {
            "input_layernorm": "norm1",
            "post_attention_layernorm": "norm2",
        }
        for theirs, ours in pairs.items():
            new[f"{dst}{theirs}.weight"] = own[f"{src}{ours}.weight"]
            new[f"{dst}{theirs}.bias"] = own[f"{src}{ours}.bias"]
        linears = {
            "attention.query_key_value": qkv,
            "attention.dense": own[src + "attn.proj.weight"],
            "mlp.dense_h_to_4h": own[src + "mlp.fc.weight"],
            "mlp.dense_4h_to_h": own[src + "mlp.proj.weight"],
        }
        for name, weight in linears.items():
            new[f"{dst}{name}.weight"] = weight
            new[f"{dst}{name}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    neox.load_state_dict(new, strict=True)
    return neox


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor, hf: bool) -> torch.Tensor:
    return (model(input_ids=x).logits if hf else model(x)).float()


def export_hf(run: LoadedRun, tmp: Path, inputs: list[torch.Tensor]) -> tuple[list[str], float]:
    """Write the HF folder into ``tmp``; the largest logit difference after reloading it."""
    from transformers import AutoModelForCausalLM

    from cadence.models.hf import HFCausalLM, _quiet_transformers

    hf = run.model.hf if isinstance(run.model, HFCausalLM) else _gpt_as_neox(run)
    hf.save_pretrained(str(tmp))
    files = sorted(p.name for p in tmp.iterdir())
    files += [f for f in _write_tokenizer(run, tmp) if f not in files]
    _quiet_transformers()
    loaded = AutoModelForCausalLM.from_pretrained(
        str(tmp), local_files_only=True, dtype=torch.float32
    ).eval()
    diff = max(
        float((_logits(run.model, x, False) - _logits(loaded, x, True)).abs().max()) for x in inputs
    )
    return files, diff
