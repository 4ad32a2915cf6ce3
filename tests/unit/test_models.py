"""Unit tests for the model zoo."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cadence.models import GPT, MLP, GPTConfig, LogisticRegression, SmallCNN

TINY = dict(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32)


def _gpt(**kw: object) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **kw}))


def test_gpt_output_shape_and_dtype() -> None:
    model = _gpt()
    idx = torch.randint(0, 64, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 64)
    assert logits.dtype == torch.float32


def test_gpt_shorter_sequence_and_start_pos() -> None:
    model = _gpt().eval()
    idx = torch.randint(0, 64, (2, 5))
    assert model(idx).shape == (2, 5, 64)
    # Beyond the precomputed rotary table the angles are computed on the fly.
    assert model(idx, start_pos=20).shape == (2, 5, 64)


def test_gpt_is_causal() -> None:
    model = _gpt().eval()
    idx = torch.randint(0, 64, (1, 16))
    t = 9
    changed = idx.clone()
    changed[0, t] = (changed[0, t] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_gpt_tied_head_shares_storage() -> None:
    model = _gpt(tie_embeddings=True)
    assert model.head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert model.output_parameter_names() == {"tok_emb.weight"}
    untied = _gpt(tie_embeddings=False)
    assert untied.head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.output_parameter_names() == {"head.weight"}
    for m in (model, untied):
        names = dict(m.named_parameters())
        assert m.output_parameter_names() <= names.keys()


def test_gpt_num_params_and_flops() -> None:
    cfg = GPTConfig(**TINY)
    model = GPT(cfg)
    d, v, layers = cfg.d_model, cfg.vocab_size, cfg.n_layer
    # per block: qkv (3d^2) + proj (d^2) + mlp (2 * 4d * d) + two RMSNorm weights (2d)
    per_block = 3 * d * d + d * d + 2 * 4 * d * d + 2 * d
    non_emb = layers * per_block + d  # + final norm
    assert model.num_params(exclude_embeddings=True) == non_emb
    assert model.num_params() == non_emb + v * d  # tied: embedding counted once
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    expected = 6 * non_emb + 12 * layers * d * cfg.seq_len
    assert model.flops_per_token() == pytest.approx(expected)
    untied = GPT(GPTConfig(**TINY, tie_embeddings=False))
    assert untied.num_params() == non_emb + 2 * v * d
    assert untied.flops_per_token() == pytest.approx(expected)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_gpt_norms_work(norm: str) -> None:
    model = _gpt(norm=norm)
    kind = torch.nn.RMSNorm if norm == "rmsnorm" else torch.nn.LayerNorm
    assert isinstance(model.norm_f, kind)
    logits = model(torch.randint(0, 64, (2, 16)))
    assert torch.isfinite(logits).all()


def test_gpt_init_loss_is_log_vocab() -> None:
    # With N(0, 0.02) weights the logits are near zero, so the predicted
    # distribution is near uniform and the cross-entropy is near ln(V).
    model = _gpt(vocab_size=256, d_model=64, n_head=4)
    idx = torch.randint(0, 256, (8, 16))
    with torch.no_grad():
        logits = model(idx)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 256), idx[:, 1:].reshape(-1))
    assert abs(loss.item() - math.log(256)) < 0.05


def test_gpt_init_scales_residual_projections() -> None:
    model = _gpt(n_layer=8, d_model=64)
    expected = 0.02 / math.sqrt(16)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_gpt_overfits_tiny_batch() -> None:
    model = _gpt()
    idx = torch.randint(0, 64, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = F.cross_entropy(model(x).reshape(-1, 64), y.reshape(-1))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_gpt_config_validation() -> None:
    with pytest.raises(ValueError, match="model.d_model"):
        GPT(GPTConfig(d_model=30, n_head=4))
    with pytest.raises(ValueError, match="model.n_head"):
        GPT(GPTConfig(d_model=12, n_head=4))  # head dim 3 is odd
    with pytest.raises(ValueError, match="model.norm"):
        GPT(GPTConfig(norm="batchnorm"))


def test_small_cnn() -> None:
    model = SmallCNN()
    out = model(torch.rand(5, 1, 28, 28))
    assert out.shape == (5, 10)
    names = dict(model.named_parameters())
    assert model.output_parameter_names() <= names.keys()
    assert names["fc2.weight"].shape == (10, 64)


def test_mlp() -> None:
    model = MLP(64, [32, 16], 10)
    assert model(torch.rand(4, 8, 8)).shape == (4, 10)
    names = dict(model.named_parameters())
    out_names = model.output_parameter_names()
    assert out_names <= names.keys()
    assert {names[n].shape for n in out_names} == {(10, 16), (10,)}
    assert MLP(5, [], 2)(torch.rand(3, 5)).shape == (3, 2)


def test_logistic_regression() -> None:
    model = LogisticRegression(30)
    out = model(torch.rand(7, 30))
    assert out.shape == (7,)
    names = dict(model.named_parameters())
    assert model.output_parameter_names() == set(names)
