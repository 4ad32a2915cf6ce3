"""Log-probabilities of token sequences: the scoring that evaluation harnesses ask a server for.

:func:`score_rows` runs on the engine thread: sequences right-padded into one forward pass (a
causal model's real tokens never attend to the padding after them, so each row scores as it
would alone), the model's logits turned into log-probabilities by ``log_softmax`` in float32,
and for each position the log-probability of the token that follows and the ``top`` most likely
next tokens, and after the last one the most likely continuations (so a greedy one-token
completion, what a harness asks with each log-likelihood, needs no generation job). :func:`logprobs_object` turns that into the ``logprobs`` object of OpenAI's legacy
completions (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["MAX_LOGPROBS", "Scored", "logprobs_object", "score_rows"]

MAX_LOGPROBS = 20  # top alternatives per position, as OpenAI allows for completions


@dataclass
class Scored:
    """One sequence's scores: ``token_logprobs[i]`` is log p(token i | tokens before it), None
    for the first token; ``top[i]`` the ``top`` most likely tokens at position i with their
    log-probabilities (empty for the first token, and when ``top`` is 0)."""

    token_logprobs: list[float | None]
    top: list[list[tuple[int, float]]]
    after: list[tuple[int, float]]  # the most likely next tokens after the whole sequence

    def extended(self, token: int) -> Scored:
        """The scores of the sequence with ``token`` appended, from ``after`` (which must hold
        it: the most likely token is always there)."""
        value = dict(self.after)[token]
        return Scored([*self.token_logprobs, value], [*self.top, self.after], [])


@torch.no_grad()
def score_rows(model: nn.Module, rows: Sequence[Sequence[int]], top: int) -> list[Scored]:
    """Score every row in one right-padded forward pass (rows must fit the model's context)."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    x = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    logp = torch.log_softmax(model(x).float(), dim=-1)
    out = []
    for i, r in enumerate(rows):
        n = len(r)
        ids = x[i, 1:n]
        picked = logp[i, : n - 1].gather(-1, ids[:, None])[:, 0]
        token_logprobs: list[float | None] = [None, *picked.tolist()]
        tops: list[list[tuple[int, float]]] = [[]]
        if top > 0 and n > 1:
            values, indices = logp[i, : n - 1].topk(top, dim=-1)
            tops += [list(zip(ix, v)) for ix, v in zip(indices.tolist(), values.tolist())]
        else:
            tops += [[] for _ in range(n - 1)]
        values, indices = logp[i, n - 1].topk(max(top, 1))
        out.append(Scored(token_logprobs, tops, list(zip(indices.tolist(), values.tolist()))))
    return out


def logprobs_object(
    tokenizer: Any, ids: Sequence[int], scored: Scored, first: int, top: int | None
) -> dict[str, Any]:
    """OpenAI's completions ``logprobs`` for ``ids[first:]`` (``first`` 0: echo, the prompt's
    first token with a null log-probability). ``text_offset`` counts characters of the returned
    text, each token decoded on its own."""
    tokens = [tokenizer.decode([t]) for t in ids[first:]]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    tops: list[dict[str, float] | None] = []
    for i in range(first, len(ids)):
        if i == 0 or not top:
            tops.append(None)
            continue
        entry: dict[str, float] = {}
        for token_id, value in scored.top[i][:top]:
            entry.setdefault(tokenizer.decode([token_id]), value)
        tops.append(entry)
    return {
        "tokens": tokens,
        "token_logprobs": scored.token_logprobs[first:],
        "top_logprobs": tops if top else None,
        "text_offset": offsets,
    }
