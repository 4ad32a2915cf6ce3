"""Generation: the KV cache changes speed, never tokens; batching changes speed, never tokens."""

from __future__ import annotations

import pytest
import torch

from cadence.models.generate import (
    SamplingParams,
    StreamDecoder,
    generate,
    generate_batch,
    sample_next,
    window_keep,
)
from cadence.models.gpt import GPT, GPTConfig, KVCache


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    # Weights scaled up so the logits are far from uniform (an untrained GPT is near-uniform,
    # where greedy ties would make the comparisons below meaningless).
    m = GPT(GPTConfig(vocab_size=48, seq_len=16, n_layer=2, n_head=2, d_model=32)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return m


def test_cached_prefill_and_decode_match_full_forward(model: GPT) -> None:
    idx = torch.randint(0, 48, (2, 12))
    cache = model.new_cache(2)
    with torch.no_grad():
        full = model(idx)
        first = model(idx[:, :7], cache=cache)
        steps = [model(idx[:, t : t + 1], start_pos=t, cache=cache) for t in range(7, 12)]
    torch.testing.assert_close(first, full[:, :7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 7:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=40, temperature=0.0),
        SamplingParams(max_new_tokens=40, temperature=1.0, seed=3),
        SamplingParams(max_new_tokens=40, temperature=0.7, top_k=5, top_p=0.9, seed=7),
    ],
    ids=["greedy", "sampled", "top-k-top-p"],
)
@pytest.mark.parametrize("prompt_len", [1, 5, 16, 23], ids=lambda n: f"prompt{n}")
def test_cached_and_uncached_generation_give_the_same_tokens(
    model: GPT, params: SamplingParams, prompt_len: int
) -> None:
    # 40 new tokens with seq_len 16: the window slides several times; a 23-token prompt is
    # longer than the context and keeps its tail.
    prompt = torch.randint(0, 48, (prompt_len,), generator=torch.Generator().manual_seed(1))
    cached = list(generate(model, prompt.tolist(), params, use_cache=True))
    uncached = list(generate(model, prompt.tolist(), params, use_cache=False))
    assert len(cached) == params.max_new_tokens
    assert cached == uncached


def test_seeded_sampling_is_reproducible_and_seed_matters(model: GPT) -> None:
    run = lambda seed: list(generate(model, [1, 2, 3], SamplingParams(30, 1.0, seed=seed)))  # noqa: E731
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_batched_generation_equals_one_at_a_time(model: GPT) -> None:
    prompts = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12], [4, 4]]
    params = [
        SamplingParams(8, 0.0),
        SamplingParams(5, 1.0, seed=1),
        SamplingParams(10, 0.7, top_k=5, seed=2),
        SamplingParams(0, 0.0),
    ]
    rows: list[list[int]] = [[] for _ in prompts]
    for step in generate_batch(model, prompts, params):
        for i, tok in enumerate(step):
            if tok is not None:
                rows[i].append(tok)
    assert rows == [list(generate(model, p, sp)) for p, sp in zip(prompts, params)]


def test_batched_generation_refuses_rows_that_would_slide(model: GPT) -> None:
    with pytest.raises(ValueError, match="generate it alone"):
        list(generate_batch(model, [[1] * 10], [SamplingParams(7, 0.0)]))


def test_window_keeps_half_the_context() -> None:
    assert window_keep(16) == 8
    assert window_keep(1) == 1


def test_sample_next_filters() -> None:
    logits = torch.tensor([0.0, 1.0, 5.0, 4.0, -1.0])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, SamplingParams(temperature=0.0), g) == 2
    top2 = {sample_next(logits, SamplingParams(top_k=2), g) for _ in range(200)}
    assert top2 <= {2, 3} and len(top2) == 2
    # p(2) ~ 0.72 alone, so top_p=0.5 keeps only token 2; top_p=0.9 keeps 2 and 3.
    assert {sample_next(logits, SamplingParams(top_p=0.5), g) for _ in range(100)} == {2}
    assert {sample_next(logits, SamplingParams(top_p=0.9), g) for _ in range(300)} == {2, 3}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_sampling_params_name_the_bad_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kwargs).check()


def test_kv_cache_refuses_overflow() -> None:
    cache = KVCache(n_layer=1, batch=1, n_head=1, max_len=4, head_dim=2)
    k = torch.zeros(1, 1, 3, 2)
    cache.update(0, 0, k, k)
    with pytest.raises(ValueError, match="exceed the cache length 4"):
        cache.update(0, 3, k, k)


def test_stream_decoder_never_splits_a_character() -> None:
    from cadence.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    text = "héllo → 世界"
    dec = StreamDecoder(tok)
    pieces = [dec.push(int(b)) for b in tok.encode(text)]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)
