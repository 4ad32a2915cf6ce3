"""The OpenAI-compatible ``POST /v1/completions`` endpoint and the text side of a completion.

Two layers live here:

- :class:`StopMatcher` and :class:`CompletionText` turn the engine's token ids into the text a
  client sees: pieces that never split a UTF-8 character (:class:`StreamDecoder`), cut at the
  first stop string, ending at the end-of-sequence token. ``/v1/generate`` uses them too.
- :func:`add_completions` registers the endpoint on the app: the OpenAI request body (lenient
  like OpenAI's: unknown fields are ignored), the response and stream chunk shapes, and errors
  rendered as ``{"error": {"message", "type", "param", "code"}}``, which the ``openai`` client
  turns into ``BadRequestError`` and friends. A body that does not validate is a 400 here, as
  on OpenAI, and every message starts with the field it is about.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from cadence.deploy.engine import Job
from cadence.deploy.generate import SamplingParams, StreamDecoder
from cadence.deploy.logprobs import MAX_LOGPROBS, Scored, logprobs_object
from cadence.deploy.rundir import LoadedRun
from cadence.deploy.serve_metrics import Metrics

if TYPE_CHECKING:  # serve.py imports this module; the settings are only read as attributes
    from cadence.deploy.serve import ServeSettings

__all__ = [
    "COMPLETIONS_PATH",
    "MAX_STOP",
    "Completion",
    "CompletionRequest",
    "CompletionText",
    "ModelError",
    "OpenAIError",
    "StopMatcher",
    "add_completions",
    "eos_token_id",
    "invalid_body",
    "openai_error",
]

COMPLETIONS_PATH = "/v1/completions"
MAX_STOP = 4  # stop strings per request, as on OpenAI

RunJob = Callable[[dict[str, Any]], tuple[Job, asyncio.Queue]]


# ---------------------------------------------------------------- text: stop strings and EOS


class StopMatcher:
    """Cut streamed text at the first stop string, holding back what could still begin one.

    :meth:`push` takes the next piece of text and returns what is safe to show: everything but
    the longest suffix that is a prefix of some stop string, since the next piece may complete
    it. Once a stop string appears, the text before it is returned, :attr:`stopped` is set and
    nothing more is accepted. :meth:`flush` returns the held-back text when the text ends
    without a stop. The concatenated output is the whole text cut before the earliest stop
    string found at the first piece that completes one, which is what OpenAI returns.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        if any(not s for s in stops):
            raise ValueError("stop: stop strings must not be empty")
        self.stops = tuple(stops)
        self.stopped = False
        self._held = ""

    def push(self, piece: str) -> str:
        if self.stopped:
            raise RuntimeError("StopMatcher.push: already stopped")
        # No stop string can start in text already returned (it would have been held back),
        # so searching the held text plus the new piece finds the earliest occurrence.
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        keep = self._holdback(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


class CompletionText:
    """One completion's token ids as text: UTF-8-safe pieces, stop strings, end of sequence.

    :meth:`push` takes each generated token and returns the new text to show (often ``""``);
    :meth:`finish` is for the engine's end of generation (``max_new_tokens`` reached) and
    returns the rest. :attr:`finish_reason` is ``"stop"`` once a stop string or the EOS token
    ends the text (stop generating then), ``"length"`` after :meth:`finish`. :attr:`tokens`
    holds every generated id, the EOS or the one that completed a stop string included;
    :attr:`text` what was shown, without the EOS token or the stop string.
    """

    def __init__(
        self, tokenizer: object, stop: Sequence[str] = (), eos_token_id: int | None = None
    ) -> None:
        self._decoder = StreamDecoder(tokenizer)
        self._stops = StopMatcher(stop)
        self.eos_token_id = eos_token_id
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> str:
        if self.finished:
            raise RuntimeError("CompletionText.push: the completion has finished")
        self.tokens.append(token)
        if token == self.eos_token_id:
            return self._end("stop")
        return self._show(self._decoder.push(token))

    def finish(self) -> str:
        return "" if self.finished else self._end("length")

    def _show(self, piece: str) -> str:
        out = self._stops.push(piece) if piece else ""
        if self._stops.stopped:
            self.finish_reason = "stop"
        self.text += out
        return out

    def _end(self, reason: str) -> str:
        out = self._show(self._decoder.flush())
        if not self.finished:
            tail = self._stops.flush()
            self.text += tail
            out += tail
            self.finish_reason = reason
        return out


def eos_token_id(run: LoadedRun) -> int | None:
    """The tokenizer's end-of-sequence id, for tokenizers that have one."""
    eos = getattr(run.tokenizer, "eos_token_id", None)
    return None if eos is None else int(eos)


class ModelError(Exception):
    """The engine reported an error for the job."""


class Completion:
    """A generate job on the engine, read as text: ``async for token, piece in completion``.

    Iteration ends when the text finishes (length, stop string or EOS). :meth:`close` cancels
    the job, so the engine stops generating for it, and counts its tokens; call it in a
    ``finally``, also when the client goes away mid-stream.
    """

    def __init__(
        self,
        run_job: RunJob,
        metrics: Metrics,
        prompt: list[int],
        params: SamplingParams,
        text: CompletionText,
    ) -> None:
        self.text = text
        self._metrics = metrics
        self._closed = False
        self._job, self._events = run_job({"kind": "generate", "prompt": prompt, "params": params})

    def __aiter__(self) -> Completion:
        return self

    async def __anext__(self) -> tuple[int | None, str]:
        """The next token (``None`` at the end of generation) and the text it adds."""
        if self.text.finished:
            raise StopAsyncIteration
        kind, value = await self._events.get()
        if kind == "token":
            return value, self.text.push(value)
        if kind == "done":
            return None, self.text.finish()
        raise ModelError(str(value))

    async def run(self) -> CompletionText:
        """Consume the whole completion (non-streaming requests)."""
        try:
            async for _ in self:
                pass
        finally:
            self.close()
        return self.text

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._job.cancel()
            self._metrics.add_tokens(len(self.text.tokens))


# ---------------------------------------------------------------- request body


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = False


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``: OpenAI's fields, with lax types (``8.0`` is an int).

    ``prompt`` is a string, a list of strings, a list of token ids or a list of token-id lists
    (a batch: one choice per prompt). ``null`` means the default for every optional field;
    unknown fields (``user``, ``frequency_penalty``, ...) are ignored.
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: Any
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    temperature: Annotated[float, Field(ge=0, le=2)] | None = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] | None = 1.0
    stop: Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int | None = 1
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    # Accepted at their defaults only: anything else would change what the response means.
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        ok = (
            isinstance(value, list)
            and value
            and (
                all(isinstance(v, str) for v in value)
                or all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                or all(
                    isinstance(v, list)
                    and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
                    for v in value
                )
            )
        )
        if not ok:
            raise PydanticCustomError(
                "prompt",
                "must be a string, a list of strings, a list of token ids or a list of "
                "token-id lists, and not empty",
            )
        return [value] if isinstance(value[0], int) else value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: list[str] | None) -> list[str] | None:
        if value and any(not s for s in value):
            raise PydanticCustomError("stop_empty", "stop strings must not be empty")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise PydanticCustomError("n", "only n=1 is supported, got {n}", {"n": value})
        return value

    def unsupported(self) -> str | None:
        """The first field set to a value this server does not implement, if any."""
        if self.best_of not in (None, 1):
            return "best_of: only best_of=1 is supported"
        if self.suffix:
            return "suffix: suffixes (insertion) are not supported"
        if self.stream and (len(self.prompt) > 1 or self.echo or self.logprobs is not None):
            return "stream: streaming is for one prompt without echo or logprobs"
        return None


# ---------------------------------------------------------------- errors


class OpenAIError(Exception):
    """Raised by the completions handler; rendered in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = openai_error(message, param, type_, code)


def openai_error(
    message: str,
    param: str | None = None,
    type_: str = "invalid_request_error",
    code: str | None = None,
) -> dict[str, Any]:
    """``{"error": {...}}`` as OpenAI writes it; ``message`` starts with the field's name."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def invalid_body(errors: list[Any]) -> OpenAIError:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    name = ".".join(str(p) for p in first.get("loc", ())) or "body"
    if first.get("type") == "json_invalid":
        name, msg = "body", f"malformed JSON ({first.get('ctx', {}).get('error', 'invalid')})"
    else:
        msg = first.get("msg", "invalid")
    return OpenAIError(400, f"{name}: {msg}", param=None if name == "body" else name)


# ---------------------------------------------------------------- the endpoint


def add_completions(
    app: FastAPI, run: LoadedRun, settings: ServeSettings, metrics: Metrics, run_job: RunJob
) -> None:
    """Register ``POST /v1/completions`` (and the rendering of its errors) on ``app``."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    body_doc = {"requestBody": {"required": True, "content": {"application/json": {}}}}

    @app.post(COMPLETIONS_PATH, response_model=None, openapi_extra=body_doc)
    async def completions(request: Request) -> dict[str, Any] | StreamingResponse:
        try:
            body = CompletionRequest.model_validate_json(await request.body() or b"null")
        except ValidationError as exc:
            raise invalid_body(exc.errors()) from None
        if (problem := body.unsupported()) is not None:
            raise OpenAIError(400, problem, param=problem.split(":")[0])
        if run.kind != "lm":
            raise OpenAIError(
                400,
                f"model: this server holds {run.what}; use {run.endpoint}",
                param="model",
            )
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
            answers = await asyncio.gather(
                *(_complete(run, metrics, run_job, p, params, body) for p in prompts)
            )
            choices = []
            for i, (text, lp) in enumerate(answers):
                shown = (texts[i] if body.echo else "") + text.text
                choices.append(choice(i, shown, text.finish_reason or "length", lp))
            done = sum(len(a[0].tokens) for a in answers)
            return {**head, "choices": choices, "usage": usage(done)}

        text = CompletionText(run.tokenizer, body.stop or (), eos_token_id(run))
        completion = Completion(run_job, metrics, prompts[0], params, text)
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
    run: LoadedRun,
    metrics: Metrics,
    run_job: RunJob,
    prompt: list[int],
    params: SamplingParams,
    body: CompletionRequest,
) -> tuple[CompletionText, dict[str, Any] | None]:
    """One prompt's completion and, if asked for, its ``logprobs``: the generated tokens that
    are shown (not a closing EOS or the token that completed a stop string), scored together
    with the prompt in one forward pass on the engine."""
    text = CompletionText(run.tokenizer, body.stop or (), eos_token_id(run))
    try:
        if params.max_new_tokens > 0:
            await Completion(run_job, metrics, prompt, params, text).run()
        if body.logprobs is None:
            return text, None
        shown = text.tokens[: len(text.tokens) - (text.finish_reason == "stop")]
        sequence = prompt + shown
        job, events = run_job({"kind": "score", "prompt": sequence, "top": body.logprobs})
        kind, value = await events.get()
    except ModelError as exc:
        raise OpenAIError(500, f"model: {exc}", type_="server_error") from None
    if kind != "result":
        raise OpenAIError(500, f"model: {value}", type_="server_error")
    scored: Scored = value
    first = 0 if body.echo else len(prompt)
    return text, logprobs_object(run.tokenizer, sequence, scored, first, body.logprobs)
