"""HTTP serving of a run: the FastAPI app, its request bodies, errors and auth.

The model side lives in :mod:`cadence.deploy.engine` (one thread owns the model and batches
concurrent requests into one forward pass; see its docstring for the concurrency model) and the
Prometheus metrics in :mod:`cadence.deploy.serve_metrics`. Request handlers here are async and
never touch the model; they put a job on the engine's queue and await its results, which is also
what streaming (server-sent events) sends.

The OpenAI-compatible ``/v1/completions`` (its body, stop strings and response shapes) is in
:mod:`cadence.deploy.openai_api`; both it and ``/v1/generate`` end a completion at a stop string
or at the tokenizer's end-of-sequence token (``finish_reason`` ``"stop"``) and then cancel the
engine job, so the engine moves on.

Errors are for people: a body that does not validate gets 422 naming the field; a prompt over
the context gets 413 and ``max_new_tokens`` over the limit 400, both naming the limit; asking a
classifier to generate (or a language model to predict) gets 400. None of them disturbs the
engine, so the server keeps serving. ``/v1/completions`` says the same in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cadence.deploy.audio_api import AudioError, is_upload, read_audio, wants_pcm
from cadence.deploy.chat_api import CHAT_PATH, MODELS_PATH, add_chat
from cadence.deploy.completions_api import add_completions
from cadence.deploy.engine import Engine, Job
from cadence.deploy.openai_api import (
    COMPLETIONS_PATH,
    MAX_STOP,
    Completion,
    CompletionText,
    ModelError,
    eos_token_id,
    openai_error,
)
from cadence.deploy.rundir import CLASSIFIER_INPUTS, LoadedRun
from cadence.deploy.serve_metrics import Metrics
from cadence.deploy.tokenizer_api import TOKENIZER_PATHS, add_tokenizer
from cadence.models.generate import SamplingParams

__all__ = [
    "API_KEY_ENV",
    "Engine",
    "GenerateRequest",
    "PredictRequest",
    "ServeSettings",
    "create_app",
]

API_KEY_ENV = "CADENCE_API_KEY"
# errors in OpenAI's shape
OPENAI_PATHS = {COMPLETIONS_PATH, CHAT_PATH, MODELS_PATH, *TOKENIZER_PATHS}


@dataclass
class ServeSettings:
    """Server limits; the defaults suit a CPU box."""

    max_new_tokens_limit: int = 512  # larger requests get 400
    max_batch: int = 16  # jobs per forward pass
    batch_wait_s: float = 0.005  # how long the engine waits to fill a batch
    max_predict_inputs: int = 1024  # examples per /v1/predict request
    max_prompts: int = 64  # prompts per /v1/completions request
    api_key: str | None = None  # bearer token required on every endpoint but /health


# ---------------------------------------------------------------- request bodies


class GenerateRequest(BaseModel):
    """Strict types: a string where a number belongs is a 422, not a silent conversion."""

    model_config = ConfigDict(strict=True, extra="forbid")

    prompt: str
    max_new_tokens: int = Field(default=64, ge=0)
    temperature: float = Field(default=1.0, ge=0)
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stream: bool = False
    stop: list[str] | None = Field(default=None, max_length=MAX_STOP)

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str] | None) -> list[str] | None:
        if value and any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value


class PredictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    # One example is a flat list of numbers, or nested lists of the model's input shape.
    inputs: list[list[Any]] = Field(min_length=1)


class HTTPError(Exception):
    """Raised by handlers; rendered as ``{"error": message}`` with the status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------- app


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


def _validation_response(errors: list[Any]) -> JSONResponse:
    """422 whose ``error`` names the first bad field (``body`` for malformed JSON)."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    name = _field_name(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        name, msg = "body", f"malformed JSON ({first.get('ctx', {}).get('error', 'invalid')})"
    else:
        msg = first.get("msg", "invalid")
    detail = [
        {"field": _field_name(tuple(e.get("loc", ()))), "message": e.get("msg")} for e in errors
    ]
    return JSONResponse({"error": f"{name}: {msg}", "detail": detail}, status_code=422)


async def _parse_body(request: Request, model: type[BaseModel]) -> Any:
    """Validate the raw body as JSON whatever the Content-Type says.

    ``curl -d`` sends form encoding by default; refusing that would only confuse people, and
    parsing the bytes ourselves also reports malformed JSON the same way as a wrong field.
    """
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        raise _Invalid(exc.errors()) from None


class _Invalid(Exception):
    def __init__(self, errors: list[Any]) -> None:
        super().__init__("invalid request")
        self.errors = errors


def _predict_tensor(run: LoadedRun, inputs: list[list[Any]]) -> torch.Tensor:
    shape = CLASSIFIER_INPUTS[run.config.workload]
    size = int(np.prod(shape))
    rows = []
    for i, example in enumerate(inputs):
        try:
            arr = np.asarray(example, dtype=np.float64)
        except (ValueError, TypeError):
            raise HTTPError(
                422, f"inputs.{i}: must be numbers (a flat list or {list(shape)})"
            ) from None
        if arr.dtype.kind not in "fiu" or arr.size != size or (arr.ndim > 1 and arr.shape != shape):
            raise HTTPError(
                422,
                f"inputs.{i}: expected {size} numbers (a flat list or an array of shape "
                f"{list(shape)}), got shape {list(arr.shape)}",
            )
        if not np.isfinite(arr).all():
            raise HTTPError(422, f"inputs.{i}: numbers must be finite")
        rows.append(arr.reshape(shape))
    return torch.from_numpy(np.stack(rows)).to(run.dtype)


def create_app(run: LoadedRun, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``run``; the engine thread starts with the app and stops with it."""
    settings = settings or ServeSettings()
    metrics = Metrics()
    state: dict[str, Engine] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["engine"] = Engine(run, settings, metrics)
        yield
        state["engine"].close()

    app = FastAPI(
        title="cadence",
        summary=f"{run.config.workload} model from {run.path}",
        lifespan=lifespan,
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(list(exc.errors()))

    @app.exception_handler(_Invalid)
    async def _invalid_body(request: Request, exc: _Invalid) -> JSONResponse:
        return _validation_response(exc.errors)

    @app.exception_handler(HTTPError)
    @app.exception_handler(AudioError)
    async def _http_error(request: Request, exc: HTTPError | AudioError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.middleware("http")
    async def _auth_and_metrics(request: Request, call_next: Callable) -> Response:
        start = time.perf_counter()
        path = request.url.path
        if settings.api_key and path != "/health":
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
                message = "authorization: missing or wrong bearer token"
                error: Any = {"error": message}
                if path in OPENAI_PATHS:
                    error = openai_error(message, code="invalid_api_key")
                response: Response = JSONResponse(
                    error,
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                metrics.observe(path, 401, time.perf_counter() - start)
                return response
        response = await call_next(request)
        known = {"/v1/generate", "/v1/predict", "/v1/transcribe", "/health", "/metrics"}
        known |= OPENAI_PATHS
        metrics.observe(
            path if path in known else "other", response.status_code, time.perf_counter() - start
        )
        return response

    def _run_job(job_kwargs: dict[str, Any]) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = Job(emit=emit, **job_kwargs)
        state["engine"].submit(job)
        return job, events

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "workload": run.config.workload,
            "kind": run.kind,
            "auth": bool(settings.api_key),
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    body_doc = {"requestBody": {"required": True, "content": {"application/json": {}}}}

    predict_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                },
            },
        }
    }

    @app.post("/v1/predict", openapi_extra=predict_doc)
    async def predict(request: Request) -> dict[str, Any]:
        if run.kind != "classifier":
            raise HTTPError(400, f"model: this server holds {run.what}; use {run.endpoint}")
        if is_upload(request) or await wants_pcm(request):
            if run.config.workload != "speech":
                raise HTTPError(
                    415, f"file: the {run.config.workload} model takes JSON inputs, not audio"
                )
            from cadence.data.speech import fit_clip

            x = torch.from_numpy(fit_clip(await read_audio(request)))[None].to(run.dtype)
        else:
            body: PredictRequest = await _parse_body(request, PredictRequest)
            if len(body.inputs) > settings.max_predict_inputs:
                raise HTTPError(
                    413,
                    f"inputs: {len(body.inputs)} examples, the limit is "
                    f"{settings.max_predict_inputs}",
                )
            x = _predict_tensor(run, body.inputs)
        _, events = _run_job({"kind": "predict", "inputs": x})
        kind, value = await events.get()
        if kind == "error":
            raise HTTPError(500, f"model: {value}")
        classes = 2 if run.config.workload == "logreg" else len(value[0])
        labels = [int(np.argmax(p)) for p in value]
        out: dict[str, Any] = {
            "probabilities": value,
            "labels": labels,
            "classes": list(range(classes)),
        }
        if run.labels is not None:  # the names the indices stand for (speech: "yes", "two"...)
            out["names"] = [run.labels[i] for i in labels]
            out["class_names"] = run.labels
        return out

    upload_doc = {
        "requestBody": predict_doc["requestBody"]
        | {
            "content": {
                "multipart/form-data": predict_doc["requestBody"]["content"]["multipart/form-data"]
            }
        }
    }

    @app.post("/v1/transcribe", openapi_extra=upload_doc)
    async def transcribe(request: Request) -> dict[str, Any]:
        if run.kind != "asr":
            raise HTTPError(400, f"model: this server holds {run.what}; use {run.endpoint}")
        from cadence.data.digit_strings import pad_to_clip

        x = torch.from_numpy(pad_to_clip(await read_audio(request)))[None].to(run.dtype)
        _, events = _run_job({"kind": "transcribe", "inputs": x})
        kind, value = await events.get()
        if kind == "error":
            raise HTTPError(500, f"model: {value}")
        return {"text": value[0], "seconds": round(x.shape[1] / 16_000, 3)}

    @app.post("/v1/generate", response_model=None, openapi_extra=body_doc)
    async def generate_endpoint(request: Request) -> dict[str, Any] | StreamingResponse:
        body: GenerateRequest = await _parse_body(request, GenerateRequest)
        if run.kind != "lm":
            raise HTTPError(400, f"model: this server holds {run.what}; use {run.endpoint}")
        if body.max_new_tokens > settings.max_new_tokens_limit:
            raise HTTPError(
                400,
                f"max_new_tokens: {body.max_new_tokens} is over the limit of "
                f"{settings.max_new_tokens_limit}",
            )
        prompt = [int(t) for t in run.tokenizer.encode(body.prompt)]  # type: ignore[union-attr]
        if not prompt:
            raise HTTPError(400, "prompt: must not be empty")
        if len(prompt) > run.seq_len:
            raise HTTPError(
                413,
                f"prompt: {len(prompt)} tokens is longer than the model's context of "
                f"{run.seq_len} tokens",
            )
        params = SamplingParams(
            body.max_new_tokens, body.temperature, body.top_k, body.top_p, body.seed
        )
        text = CompletionText(run.tokenizer, body.stop or (), eos_token_id(run))
        completion = Completion(_run_job, metrics, prompt, params, text)

        def summary() -> dict[str, Any]:
            return {
                "text": text.text,
                "tokens": text.tokens,  # with the EOS token, if that ended the text
                "prompt_tokens": len(prompt),
                "completion_tokens": len(text.tokens),
                "finish_reason": text.finish_reason,
            }

        if not body.stream:
            try:
                await completion.run()
            except ModelError as exc:
                raise HTTPError(500, f"model: {exc}") from None
            return summary()

        async def sse() -> AsyncIterator[str]:
            try:
                async for token, piece in completion:
                    if token is not None or piece:
                        yield f"data: {json.dumps({'token': token, 'text': piece})}\n\n"
                yield f"event: done\ndata: {json.dumps(summary())}\n\n"
            except ModelError as exc:
                yield f"event: error\ndata: {json.dumps({'error': f'model: {exc}'})}\n\n"
            finally:
                completion.close()

        return StreamingResponse(sse(), media_type="text/event-stream")

    add_completions(app, run, settings, metrics, _run_job)
    if run.kind == "lm":
        add_chat(app, run, settings, metrics, _run_job)
        add_tokenizer(app, run)
    return app


def serve(
    run: LoadedRun,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    log_level: str = "info",
) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    settings = settings or ServeSettings()
    if settings.api_key is None:
        settings.api_key = os.environ.get(API_KEY_ENV) or None
    uvicorn.run(create_app(run, settings), host=host, port=port, log_level=log_level)
