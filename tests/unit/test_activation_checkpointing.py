"""`train.activation_checkpointing`: the same gradients from less saved activation memory.

The memory is counted, not timed: every tensor autograd saves for the backward pass goes
through `torch.autograd.graph.saved_tensors_hooks`, which adds up its bytes.
"""

from __future__ import annotations

import pytest
import torch

import cadence
from cadence.models import GPT, GPTConfig
from cadence.training import Trainer, fit
from cadence.workloads import build_workload


def _gpt(dropout: float = 0.1) -> GPT:
    torch.manual_seed(0)
    return GPT(
        GPTConfig(vocab_size=64, seq_len=32, n_layer=3, n_head=2, d_model=32, dropout=dropout)
    )


def _step(model: GPT, idx: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(
            model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()
        )
    loss.backward()
    return [p.grad.clone() for p in model.parameters()], saved[0]


def test_checkpointed_blocks_give_the_same_gradients_from_less_memory():
    idx = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(2))
    model = _gpt()
    plain, plain_bytes = _step(model, idx)
    model.set_activation_checkpointing(True)
    recomputed, ckpt_bytes = _step(model, idx)
    for a, b in zip(plain, recomputed):
        assert torch.equal(a, b)  # dropout's masks are replayed: bitwise the same
    # Only each block's inputs stay saved (plus the embedding, final norm and head).
    assert ckpt_bytes < plain_bytes / 2, (ckpt_bytes, plain_bytes)


def test_evaluation_and_generation_do_not_recompute():
    model = _gpt(dropout=0.0)
    model.set_activation_checkpointing(True)
    model.eval()
    idx = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2)
        assert torch.allclose(model(idx, cache=cache), full, atol=1e-6)


def test_a_run_with_checkpointing_trains_the_same_weights(tmp_path):
    overrides = [
        "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.seq_len=16",
        "model.dropout=0.1", "data.max_bytes=50000", "batch.size=4", "train.max_steps=4",
        "train.eval_every=4", "train.eval_samples=8", "train.progress=false",
    ]  # fmt: skip
    weights = []
    for flag in ("false", "true"):
        cfg = cadence.load_config(None, [*overrides, f"train.activation_checkpointing={flag}"])
        w = build_workload(cfg)
        fit(Trainer(cfg, w))
        weights.append({k: v.clone() for k, v in w.model.state_dict().items()})
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_a_workload_without_blocks_refuses_it():
    with pytest.raises(cadence.ConfigError, match=r"^train\.activation_checkpointing: "):
        cadence.load_config("sgd-mnist", ["train.activation_checkpointing=true"])
