"""OpenAI's legacy ``POST /v1/completions``: generation, and scoring for evaluation harnesses.

A request holds one prompt or a batch (strings or token ids); each prompt's completion runs on
the engine as a generate job (:class:`cadence.deploy.kinds.lm.LMJobs`), and with
``logprobs`` the prompt and the shown completion are scored together in one more job
(:mod:`cadence.deploy.logprobs`). The text pieces, request body and error shape live in
:mod:`cadence.deploy.openai_api`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from cadence.deploy.logprobs import logprobs_object
from cadence.deploy.openai_api import (
    COMPLETIONS_PATH,
    JSON_BODY,
    CompletionRequest,
    CompletionText,
    LMEngine,
    ModelError,
    OpenAIError,
    eos_token_id,
    openai_error,
    parse_body,
)
from cadence.deploy.rundir import LoadedRun
from cadence.models.generate import SamplingParams

if TYPE_CHECKING:  # the task that mounts these routes hands them the engine's side
    from cadence.deploy.engine import ServeSettings
    from cadence.deploy.task import ServeContext

__all__ = ["add_completions"]


def add_completions(app: FastAPI, ctx: ServeContext, lm: LMEngine) -> None:
    """Register ``POST /v1/completions`` on a language model's ``app``."""
    run, settings = ctx.run, ctx.settings

    @app.post(COMPLETIONS_PATH, response_model=None, openapi_extra=JSON_BODY)
    async def completions(request: Request) -> dict[str, Any] | StreamingResponse:
        body = await parse_body(request, CompletionRequest)
        if (problem := body.unsupported()) is not None:
            raise OpenAIError(400, problem, param=problem.split(":")[0])
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens > settings.max_new_tokens_limit:
            raise OpenAIError(
                400,
                f"max_tokens: {max_tokens} is over the limit of {settings.max_new_tokens_limit}",
                param="max_tokens",
            )
        scoring = bool(body.echo) or body.logprobs is not None
        prompts, texts = _prompts(body.prompt, run, settings, max_tokens if scoring else None)
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model or run.path.resolve().name,
        }

        def choice(index: int, piece: str, finish: str | None, lp: Any = None) -> dict[str, Any]:
            return {"index": index, "text": piece, "finish_reason": finish, "logprobs": lp}

        def usage(done: int) -> dict[str, int]:
            given = sum(len(p) for p in prompts)
            return {"prompt_tokens": given, "completion_tokens": done, "total_tokens": given + done}

        if not body.stream:
            answers = await asyncio.gather(*(_complete(ctx, lm, p, params, body) for p in prompts))
            choices = []
            for i, (text, lp) in enumerate(answers):
                shown = (texts[i] if body.echo else "") + text.text
                choices.append(choice(i, shown, text.finish_reason or "length", lp))
            done = sum(len(a[0].tokens) for a in answers)
            return {**head, "choices": choices, "usage": usage(done)}

        text = CompletionText(run.tokenizer, body.stop or (), eos_token_id(run))
        completion = lm.completion(prompts[0], params, text)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        def event(data: dict[str, Any]) -> str:
            return f"data: {json.dumps(data)}\n\n"

        async def sse() -> AsyncIterator[str]:
            try:
                async for _, piece in completion:
                    if text.finished:
                        yield event(
                            {**head, "choices": [choice(0, piece, text.finish_reason)], **extra}
                        )
                    elif piece:
                        yield event({**head, "choices": [choice(0, piece, None)], **extra})
                if include_usage:
                    yield event({**head, "choices": [], "usage": usage(len(text.tokens))})
            except ModelError as exc:
                yield event(openai_error(f"model: {exc}", type_="server_error"))
            finally:
                completion.close()
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")


def _prompts(
    raw: list[Any], run: LoadedRun, settings: ServeSettings, scored_tokens: int | None
) -> tuple[list[list[int]], list[str]]:
    """The request's prompts as token ids and as text, each checked; ``scored_tokens`` (the
    tokens to generate, when the request asks for log-probabilities) means prompt and answer
    must fit the context, since a scored sequence cannot slide its window."""
    tok = run.tokenizer
    if len(raw) > settings.max_prompts:
        raise OpenAIError(
            400,
            f"prompt: {len(raw)} prompts in one request, the limit is {settings.max_prompts}",
            param="prompt",
        )
    prompts, texts = [], []
    vocab = int(tok.vocab_size)  # type: ignore[union-attr]
    for i, item in enumerate(raw):
        name = "prompt" if len(raw) == 1 else f"prompt.{i}"
        ids = [int(t) for t in tok.encode(item)] if isinstance(item, str) else list(item)  # type: ignore[union-attr]
        if not ids:
            raise OpenAIError(400, f"{name}: must not be empty", param=name)
        bad = next((j for j, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise OpenAIError(
                400,
                f"{name}: token id {ids[bad]} (position {bad}) is not in the vocabulary of {vocab}",
                param=name,
            )
        if scored_tokens is not None and len(ids) + scored_tokens > run.seq_len:
            raise OpenAIError(
                400,
                f"{name}: {len(ids)} tokens + max_tokens {scored_tokens} is longer than the "
                f"model's context of {run.seq_len} tokens, which scoring cannot exceed",
                param=name,
                code="context_length_exceeded",
            )
        if len(ids) > run.seq_len:
            raise OpenAIError(
                413,
                f"{name}: {len(ids)} tokens is longer than the model's context of "
                f"{run.seq_len} tokens",
                param=name,
                code="context_length_exceeded",
            )
        prompts.append(ids)
        texts.append(item if isinstance(item, str) else tok.decode(ids))  # type: ignore[union-attr]
    return prompts, texts


async def _complete(
    ctx: ServeContext,
    lm: LMEngine,
    prompt: list[int],
    params: SamplingParams,
    body: CompletionRequest,
) -> tuple[CompletionText, dict[str, Any] | None]:
    """One prompt's completion and, if asked for, its ``logprobs``: the generated tokens that
    are shown (not a closing EOS or the token that completed a stop string), scored together
    with the prompt in one forward pass on the engine. A greedy single token is taken from
    that pass itself: one engine job instead of two."""
    run = ctx.run
    text = CompletionText(run.tokenizer, body.stop or (), eos_token_id(run))
    top = body.logprobs
    try:
        if top is not None and params.max_new_tokens == 1 and params.temperature == 0:
            # One greedy token with log-probabilities (a harness's log-likelihood request):
            # the pass that scores the prompt also gives the most likely next token.
            scored = await lm.score(prompt, top)
            token = scored.after[0][0]
            text.push(token)
            text.finish()
            ctx.metrics.add_tokens(1)
            shown = [token] if text.finish_reason != "stop" else []
            sequence = prompt + shown
            scored = scored.extended(token) if shown else scored
        else:
            if params.max_new_tokens > 0:
                await lm.completion(prompt, params, text).run()
            if top is None:
                return text, None
            shown = text.tokens[: len(text.tokens) - (text.finish_reason == "stop")]
            sequence = prompt + shown
            scored = await lm.score(sequence, top)
    except ModelError as exc:
        raise OpenAIError(500, f"model: {exc}", type_="server_error") from None
    first = 0 if body.echo else len(prompt)
    return text, logprobs_object(run.tokenizer, sequence, scored, first, top)
