"""Packed rows compute what each sequence computes alone: cadence's GPT and an HF Llama (sdpa
and eager attention), against separate forward passes of the same weights."""

from __future__ import annotations

import pytest
import torch

from cadence.models.gpt import GPT, GPTConfig
from cadence.models.hf import HFCausalLM
from cadence.models.packing import segment_positions
from hf_models import LLAMA


def _packed_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 50, (1, 5), generator=g)
    b = torch.randint(0, 50, (1, 7), generator=g)
    packed = torch.cat([a, b, torch.zeros(1, 4, dtype=torch.long)], 1)
    seg = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4])
    return a, b, packed, seg


def test_positions_restart_at_each_sequence():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [4, 4, 4, 4, 4, 4]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def _check(model: torch.nn.Module) -> None:
    a, b, packed, seg = _packed_inputs()
    with torch.no_grad():
        out = model(packed, segments=seg)
        assert (out[:, :5] - model(a)).abs().max() < 1e-5
        assert (out[:, 5:12] - model(b)).abs().max() < 1e-5
        assert (model(packed)[:, 5:12] - model(b)).abs().max() > 1e-3  # unpacked: they mix


def test_the_gpt_keeps_packed_sequences_apart():
    torch.manual_seed(0)
    _check(GPT(GPTConfig(vocab_size=50, seq_len=16, n_layer=2, n_head=2, d_model=32)).eval())


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_an_hf_llama_keeps_packed_sequences_apart(impl):
    from transformers import LlamaConfig

    config = LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}, vocab_size=50)
    config._attn_implementation = impl
    torch.manual_seed(0)
    _check(HFCausalLM.from_config(config).eval())
