"""The served model's tokenizer over HTTP, in the shapes vLLM serves: ``GET /tokenizer_info``,
``POST /tokenize`` and ``POST /detokenize``.

Clients that count or build token ids themselves use these instead of loading a tokenizer of
their own: lm-evaluation-harness's ``local-completions`` probes ``/tokenizer_info`` (it needs an
``eos_token`` key, null allowed) and ``/tokenize`` at the server's root and then tokenizes every
request through them, so the ids it scores with are the server's. cadence's tokenizers add no
special tokens when encoding (training never did), so ``add_special_tokens`` changes nothing; a
special token written in the text (``</s>``) encodes to its id.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cadence.data.chat import encode_prompt
from cadence.data.errors import DataError
from cadence.deploy.chat_api import Message, chat_renderer, chat_template
from cadence.deploy.openai_api import JSON_BODY, OpenAIError, parse_body
from cadence.deploy.rundir import LoadedRun

__all__ = ["TOKENIZER_PATHS", "add_tokenizer", "tokenizer_info"]

TOKENIZER_PATHS = {"/tokenizer_info", "/tokenize", "/detokenize"}


class TokenizeRequest(BaseModel):
    """``{"prompt": text}`` or ``{"messages": [...]}`` (rendered as ``/v1/chat/completions``
    renders them, with the generation prompt unless ``add_generation_prompt`` is false)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def tokenizer_info(run: LoadedRun) -> dict[str, Any]:
    """What a client needs to use the server's tokenizer: its special tokens (null where it has
    none: cadence's byte and BPE tokenizers have no end-of-sequence token), chat template and
    context."""
    tok = run.tokenizer
    special = getattr(tok, "special_token", None)
    names = ("eos_token", "bos_token", "pad_token")
    return {
        "tokenizer_class": type(tok).__name__,
        **{n: special(n) if special is not None else None for n in names},
        "chat_template": chat_template(run),
        "model_max_length": run.seq_len,
        "vocab_size": int(tok.vocab_size),  # type: ignore[union-attr]
    }


def add_tokenizer(app: FastAPI, run: LoadedRun) -> None:
    """Register the tokenizer endpoints on a language model's app."""
    tok = run.tokenizer
    render = chat_renderer(run)

    @app.get("/tokenizer_info")
    async def info() -> dict[str, Any]:
        return tokenizer_info(run)

    @app.post("/tokenize", openapi_extra=JSON_BODY)
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await parse_body(request, TokenizeRequest)
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in body.messages]
            try:
                if body.add_generation_prompt is False:
                    ids = tok.encode(render(messages, False))  # type: ignore[union-attr]
                else:
                    ids = encode_prompt(messages, tok.encode, render)  # type: ignore[union-attr]
            except DataError as exc:
                raise OpenAIError(400, f"messages: {exc}", param="messages") from None
        else:
            ids = tok.encode(body.prompt or "")  # type: ignore[union-attr]
        tokens = [int(t) for t in ids]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": run.seq_len}

    @app.post("/detokenize", openapi_extra=JSON_BODY)
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await parse_body(request, DetokenizeRequest)
        vocab = int(tok.vocab_size)  # type: ignore[union-attr]
        bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < vocab), None)
        if bad is not None:
            raise OpenAIError(
                400,
                f"tokens.{bad}: {body.tokens[bad]} is not a token id of this model (0 to "
                f"{vocab - 1})",
                param=f"tokens.{bad}",
            )
        return {"prompt": tok.decode(body.tokens)}  # type: ignore[union-attr]
