"""OpenAI's ``POST /v1/chat/completions`` and ``GET /v1/models`` for a served language model.

Messages are rendered with the run's chat template -- the ``chat_template.jinja`` a chat run
saved, else the one in the run's Hugging Face tokenizer files, else cadence's default (the one
chat training uses for cadence's own tokenizers) -- and encoded exactly as training encoded the
same conversation (:func:`cadence.data.chat.encode_prompt`), so a fine-tuned model is served the
prompts it learned from. Generation ends at the tokenizer's end-of-sequence token, at the
client's ``stop`` strings, or where the template closes an answer (``<|end|>`` for the default).
The generation itself is :class:`cadence.deploy.openai_api.Completion` on the engine, as for
``/v1/completions``; the shapes (``chat.completion``, streamed ``chat.completion.chunk`` with a
``delta``, usage on request, ``[DONE]``) and errors are OpenAI's.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from jinja2.exceptions import TemplateError
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from cadence.data.chat import (
    DEFAULT_TEMPLATE,
    TEMPLATE_FILE,
    Renderer,
    answer_end,
    encode_prompt,
    jinja_renderer,
)
from cadence.data.errors import DataError
from cadence.deploy.logprobs import MAX_LOGPROBS, Scored
from cadence.deploy.openai_api import (
    JSON_BODY,
    CompletionText,
    LMEngine,
    ModelError,
    OpenAIError,
    SamplingRequest,
    eos_token_id,
    openai_error,
    parse_body,
)
from cadence.deploy.rundir import LoadedRun
from cadence.models.generate import SamplingParams

if TYPE_CHECKING:
    from cadence.deploy.task import ServeContext

__all__ = [
    "CHAT_PATH",
    "MODELS_PATH",
    "ChatRequest",
    "add_chat",
    "chat_renderer",
    "chat_template",
    "model_id",
]

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"


def chat_template(run: LoadedRun) -> str:
    """The template this run's conversations are rendered with (see the module docstring)."""
    saved = run.path / TEMPLATE_FILE
    if saved.is_file():
        return saved.read_text(encoding="utf-8")
    config = run.path / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError):
            template = None
        if isinstance(template, str) and template.strip():
            return template
    return DEFAULT_TEMPLATE


def chat_renderer(run: LoadedRun) -> Renderer:
    """The run's chat template as a renderer, with the tokenizer's ``bos_token`` and
    ``eos_token`` in scope as Hugging Face templates expect (empty where it has none)."""
    special = getattr(run.tokenizer, "special_token", None)
    context = {k: (special(k) if special else None) or "" for k in ("bos_token", "eos_token")}
    return jinja_renderer(chat_template(run), **context)


def model_id(run: LoadedRun) -> str:
    """The name the server gives its one model: the run folder's name."""
    return run.path.resolve().name


# ---------------------------------------------------------------- request body


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """OpenAI's content parts (``[{"type": "text", "text": ...}]``) joined; other parts
        (images, audio) are not something a text model can take."""
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise PydanticCustomError("content", "only text content parts are supported")
            texts.append(str(part.get("text", "")))
        return "".join(texts)


class ChatRequest(SamplingRequest):
    """The body of ``POST /v1/chat/completions``."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    def unsupported(self) -> str | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs: needs logprobs: true"
        if self.stream and self.logprobs:
            return "logprobs: not with stream; ask for the whole answer"
        return None


# ---------------------------------------------------------------- log-probabilities


def chat_logprobs(
    tokenizer: Any, ids: list[int], scored: Scored, first: int, top: int
) -> dict[str, Any]:
    """The chat shape: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}``
    for the answer's tokens ``ids[first:]``. A token that is part of a character decodes to a
    replacement character; its ``bytes`` are its own where the tokenizer knows them (byte
    tokenizer), so joining them gives the answer's UTF-8."""

    raw = getattr(tokenizer, "token_bytes", None)

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id])
        data = raw(token_id) if raw is not None else text.encode("utf-8")
        return {"token": text, "logprob": logprob, "bytes": list(data)}

    content = []
    for i in range(first, len(ids)):
        item = entry(ids[i], scored.token_logprobs[i])  # type: ignore[arg-type]
        item["top_logprobs"] = [entry(t, v) for t, v in scored.top[i][:top]]
        content.append(item)
    return {"content": content, "refusal": None}


# ---------------------------------------------------------------- the endpoints


def add_chat(app: FastAPI, ctx: ServeContext, lm: LMEngine) -> None:
    """Register ``POST /v1/chat/completions`` and ``GET /v1/models`` on a language model's
    ``app``."""
    run, settings = ctx.run, ctx.settings
    render = chat_renderer(run)
    try:
        end = answer_end(render)
    except (TemplateError, TypeError, KeyError):
        end = ""

    @app.get(MODELS_PATH)
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_id(run),
                    "object": "model",
                    "created": int(run.weights.stat().st_mtime),
                    "owned_by": "cadence",
                    "max_model_len": run.seq_len,
                }
            ],
        }

    @app.post(CHAT_PATH, response_model=None, openapi_extra=JSON_BODY)
    async def chat(request: Request) -> dict[str, Any] | StreamingResponse:
        body = await parse_body(request, ChatRequest)
        if (problem := body.unsupported()) is not None:
            raise OpenAIError(400, problem, param=problem.split(":")[0])
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in body.messages
        ]
        try:
            prompt = [int(t) for t in encode_prompt(messages, run.tokenizer.encode, render)]  # type: ignore[union-attr]
        except (DataError, TemplateError) as exc:
            raise OpenAIError(400, f"messages: {exc}", param="messages") from None
        if len(prompt) >= run.seq_len:
            raise OpenAIError(
                400,
                f"messages: the rendered conversation is {len(prompt)} tokens, the model's "
                f"context is {run.seq_len}; shorten it",
                param="messages",
                code="context_length_exceeded",
            )
        room = min(settings.max_new_tokens_limit, run.seq_len - len(prompt))
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > settings.max_new_tokens_limit:
            field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise OpenAIError(
                400,
                f"{field}: {asked} is over the limit of {settings.max_new_tokens_limit}",
                param=field,
            )
        if body.logprobs and asked is not None and len(prompt) + asked > run.seq_len:
            field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise OpenAIError(
                400,
                f"{field}: with logprobs, the conversation ({len(prompt)} tokens) and the answer "
                f"must fit the context of {run.seq_len} tokens",
                param=field,
                code="context_length_exceeded",
            )
        params = SamplingParams(
            max_new_tokens=asked if asked is not None else room,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
        stops = list(body.stop or ()) + ([end] if end and end not in (body.stop or ()) else [])
        text = CompletionText(run.tokenizer, stops, eos_token_id(run))
        completion = lm.completion(prompt, params, text)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": body.model or model_id(run),
        }

        def usage() -> dict[str, int]:
            done = len(text.tokens)
            return {
                "prompt_tokens": len(prompt),
                "completion_tokens": done,
                "total_tokens": len(prompt) + done,
            }

        if not body.stream:
            try:
                await completion.run()
            except ModelError as exc:
                raise OpenAIError(500, f"model: {exc}", type_="server_error") from None
            message = {"role": "assistant", "content": text.text}
            choice = {"index": 0, "message": message, "finish_reason": text.finish_reason}
            choice["logprobs"] = None
            if body.logprobs:
                shown = text.tokens[: len(text.tokens) - (text.finish_reason == "stop")]
                try:
                    scored = await lm.score(prompt + shown, body.top_logprobs or 0)
                except ModelError as exc:
                    raise OpenAIError(500, f"model: {exc}", type_="server_error") from None
                choice["logprobs"] = chat_logprobs(
                    run.tokenizer, prompt + shown, scored, len(prompt), body.top_logprobs or 0
                )
            return {**head, "object": "chat.completion", "choices": [choice], "usage": usage()}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            data = {**head, "object": "chat.completion.chunk", "choices": [choice], **extra}
            return f"data: {json.dumps(data)}\n\n"

        async def sse() -> AsyncIterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""}, None)
                async for _, piece in completion:
                    if piece:
                        yield chunk({"content": piece}, None)
                    if text.finished:
                        yield chunk({}, text.finish_reason)
                if include_usage:
                    data = {**head, "object": "chat.completion.chunk", "choices": []}
                    yield f"data: {json.dumps({**data, 'usage': usage()})}\n\n"
            except ModelError as exc:
                yield f"data: {json.dumps(openai_error(f'model: {exc}', type_='server_error'))}\n\n"
            finally:
                completion.close()
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")
