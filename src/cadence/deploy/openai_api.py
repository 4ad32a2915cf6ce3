"""The OpenAI-compatible API's shared pieces: the text side of a completion, the request body, errors.

Two layers live here:

- :class:`StopMatcher` and :class:`CompletionText` turn the engine's token ids into the text a
  client sees: pieces that never split a UTF-8 character (:class:`StreamDecoder`), cut at the
  first stop string, ending at the end-of-sequence token. ``/v1/generate`` uses them too.
- the OpenAI request body (lenient like OpenAI's: unknown fields are ignored) and errors
  rendered as ``{"error": {"message", "type", "param", "code"}}``, which the ``openai`` client
  turns into ``BadRequestError`` and friends. A body that does not validate is a 400, as on
  OpenAI, and every message starts with the field it is about. The endpoint itself is in
  :mod:`cadence.deploy.completions_api`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from cadence.deploy.engine import Job
from cadence.deploy.logprobs import MAX_LOGPROBS, Scored
from cadence.deploy.rundir import LoadedRun
from cadence.deploy.serve_metrics import Metrics
from cadence.models.generate import SamplingParams, StreamDecoder

__all__ = [
    "COMPLETIONS_PATH",
    "JSON_BODY",
    "MAX_STOP",
    "Completion",
    "CompletionRequest",
    "CompletionText",
    "LMEngine",
    "ModelError",
    "OpenAIError",
    "SamplingRequest",
    "StopMatcher",
    "eos_token_id",
    "invalid_body",
    "openai_error",
    "parse_body",
]

COMPLETIONS_PATH = "/v1/completions"
# OpenAPI's request body of the JSON endpoints: they parse the raw bytes themselves (parse_body)
JSON_BODY = {"requestBody": {"required": True, "content": {"application/json": {}}}}
MAX_STOP = 4  # stop strings per request, as on OpenAI


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
    """A generate job on the engine (submitted by :class:`cadence.deploy.kinds.lm.LMJobs`),
    read as text: ``async for token, piece in completion``.

    Iteration ends when the text finishes (length, stop string or EOS). :meth:`close` cancels
    the job, so the engine stops generating for it, and counts its tokens; call it in a
    ``finally``, also when the client goes away mid-stream.
    """

    def __init__(
        self, job: Job, events: asyncio.Queue, metrics: Metrics, text: CompletionText
    ) -> None:
        self.text = text
        self._metrics = metrics
        self._closed = False
        self._job, self._events = job, events

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


class LMEngine(Protocol):
    """What the OpenAI routes ask of the engine; :class:`cadence.deploy.kinds.lm.LMJobs` is it."""

    def completion(
        self, prompt: list[int], params: SamplingParams, text: CompletionText
    ) -> Completion: ...

    async def score(self, sequence: list[int], top: int) -> Scored: ...


# ---------------------------------------------------------------- request body


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = False


class SamplingRequest(BaseModel):
    """The fields OpenAI's completions and chat bodies share, with lax types (``8.0`` is an
    int); ``null`` means the default for every optional field; unknown fields (``user``,
    ``frequency_penalty``, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] | None = 1.0
    stop: Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int | None = 1

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


class CompletionRequest(SamplingRequest):
    """The body of ``POST /v1/completions``. ``prompt`` is a string, a list of strings, a list
    of token ids or a list of token-id lists (a batch: one choice per prompt)."""

    prompt: Any
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
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


Body = TypeVar("Body", bound=BaseModel)


async def parse_body(request: Request, model: type[Body]) -> Body:
    """The request's JSON as ``model``; a body that does not validate is a 400 naming the
    field, in OpenAI's error shape."""
    try:
        return model.model_validate_json(await request.body() or b"null")
    except ValidationError as exc:
        raise invalid_body(exc.errors()) from None
