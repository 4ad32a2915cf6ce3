"""Autoregressive text generation for language-model runs (cadence's GPT or a Hugging Face
causal LM behind ``HFCausalLM``, which share one interface), with a KV cache and a sliding
context window.

The context window. A GPT was trained on ``seq_len`` positions. When prompt + generated tokens
would exceed that, the window *slides*: the context is cut to its last ``seq_len // 2`` tokens,
which are re-encoded from position 0, and decoding continues from there with the cache. Halving
(rather than dropping one token per step) keeps the re-encoding cost at one prefill every
``seq_len / 2`` tokens. The uncached path applies exactly the same rule, so both produce the same
tokens; :func:`generate` with ``use_cache=False`` is the reference the tests compare against.

Sampling: ``temperature == 0`` is greedy; otherwise logits / temperature, then top-k, then top-p
(nucleus) filtering, then a draw from a ``torch.Generator`` seeded per request, so a seeded
request is reproducible whatever else the server is doing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cadence.models.gpt import GPT

if TYPE_CHECKING:
    from cadence.models.hf import HFCausalLM

__all__ = [
    "SamplingParams",
    "StreamDecoder",
    "generate",
    "generate_batch",
    "sample_next",
    "window_keep",
]


@dataclass
class SamplingParams:
    """How to pick each next token; validated by :meth:`check`."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set whose probability reaches p
    seed: int | None = None  # seeds this request's generator; None = nondeterministic

    def check(self) -> None:
        """Raise ValueError naming the field, so the CLI and the server can report it."""
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def window_keep(seq_len: int) -> int:
    """How many tokens of context survive when the window slides."""
    return max(1, seq_len // 2)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from the logits [V] of the last position."""
    logits = logits.float()
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: GPT | HFCausalLM,
    prompt: Sequence[int],
    params: SamplingParams,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield ``params.max_new_tokens`` new token ids, one at a time (for streaming)."""
    params.check()
    if len(prompt) == 0:
        raise ValueError("prompt: must hold at least one token")
    seq_len = model.context_length
    device = next(model.parameters()).device
    tokens = list(prompt)
    start = max(0, len(tokens) - seq_len)  # a prompt longer than the window keeps its tail
    gen = params.generator()
    cache = model.new_cache(1) if use_cache else None
    cached = 0  # tokens of tokens[start:] already in the cache
    for _ in range(params.max_new_tokens):
        if len(tokens) - start > seq_len:
            start = len(tokens) - window_keep(seq_len)
            cached = 0
        ctx = tokens[start:]
        if cache is None:
            logits = model(torch.tensor([ctx], device=device))[0, -1]
        else:
            new = torch.tensor([ctx[cached:]], device=device)
            logits = model(new, start_pos=cached, cache=cache)[0, -1]
            cached = len(ctx)
        nxt = sample_next(logits, params, gen)
        tokens.append(nxt)
        yield nxt


@torch.no_grad()
def generate_batch(
    model: GPT | HFCausalLM, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
) -> Iterator[list[int | None]]:
    """Decode several requests together: one forward per step for the whole batch.

    Prompts are left-padded to a common length and the padding is masked in the cache, so each
    row gives the tokens it would give alone. Every row must fit in the context
    (``len(prompt) + max_new_tokens <= seq_len``): the window never slides here, because rows
    would need to slide at different steps. Yields, per step, each row's new token or ``None``
    once that row has its ``max_new_tokens``.
    """
    seq_len = model.context_length
    for i, (p, sp) in enumerate(zip(prompts, params)):
        sp.check()
        if not p or len(p) + sp.max_new_tokens > seq_len:
            raise ValueError(
                f"generate_batch: row {i} needs 1..{seq_len} positions, has "
                f"{len(p)} + {sp.max_new_tokens}; generate it alone"
            )
    device = next(model.parameters()).device
    b, width = len(prompts), max(len(p) for p in prompts)
    steps = max(sp.max_new_tokens for sp in params)
    idx = torch.zeros(b, width, dtype=torch.long, device=device)
    cache = model.new_cache(b, width + steps)
    cache.valid[:, :width] = False
    for i, p in enumerate(prompts):
        idx[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        cache.valid[i, width - len(p) :] = True
    gens = [sp.generator() for sp in params]
    logits = model(idx, start_pos=0, cache=cache)[:, -1]
    pos = width
    for step in range(steps):
        out: list[int | None] = [
            sample_next(logits[i], sp, gens[i]) if step < sp.max_new_tokens else None
            for i, sp in enumerate(params)
        ]
        yield out
        if step + 1 == steps:
            break
        nxt = torch.tensor([[t if t is not None else 0] for t in out], device=device)
        logits = model(nxt, start_pos=pos, cache=cache)[:, -1]
        pos += 1


class StreamDecoder:
    """Turn a stream of token ids into text pieces without splitting a character.

    A byte-level token can be half of a UTF-8 character; decoding it alone would print U+FFFD.
    The whole sequence is decoded each time and only the stable new suffix is emitted, holding
    back text that ends in a replacement character until the next token completes it.
    """

    def __init__(self, tokenizer: object) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self._tok.decode(self._ids)  # type: ignore[attr-defined]
        if text.endswith("\ufffd"):
            return ""
        piece = text[self._emitted :]
        self._emitted = len(text)
        return piece

    def flush(self) -> str:
        text = self._tok.decode(self._ids)  # type: ignore[attr-defined]
        piece = text[self._emitted :]
        self._emitted = len(text)
        return piece
