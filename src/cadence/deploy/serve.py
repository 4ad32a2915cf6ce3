"""HTTP serving of a run: FastAPI app, a batching engine thread, Prometheus metrics.

Concurrency model. Request handlers are async and never touch the model; they put a job on a
queue and await its results. One engine thread owns the model: it takes the first waiting job,
gathers the others that arrive within ``batch_wait_s`` (up to ``max_batch``) and runs them as one
forward pass — stacked inputs for classifiers, left-padded rows with a shared KV cache for
language models (:func:`cadence.deploy.generate.generate_batch`). A generation that would slide
its context window runs alone, since rows of a batch cannot slide at different steps. Tokens are
handed back to the event loop as they are produced, which is what streaming (server-sent events)
sends.

Errors are for people: a body that does not validate gets 422 naming the field; a prompt over
the context gets 413 and ``max_new_tokens`` over the limit 400, both naming the limit; asking a
classifier to generate (or a language model to predict) gets 400. None of them disturbs the
engine, so the server keeps serving.
"""

from __future__ import annotations

import asyncio
import bisect
import hmac
import json
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cadence.deploy.generate import (
    SamplingParams,
    StreamDecoder,
    generate,
    generate_batch,
)
from cadence.deploy.rundir import CLASSIFIER_INPUTS, LoadedRun

__all__ = [
    "API_KEY_ENV",
    "Engine",
    "GenerateRequest",
    "PredictRequest",
    "ServeSettings",
    "create_app",
]

API_KEY_ENV = "CADENCE_API_KEY"


@dataclass
class ServeSettings:
    """Server limits; the defaults suit a CPU box."""

    max_new_tokens_limit: int = 512  # larger requests get 400
    max_batch: int = 16  # jobs per forward pass
    batch_wait_s: float = 0.005  # how long the engine waits to fill a batch
    max_predict_inputs: int = 1024  # examples per /v1/predict request
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


# ---------------------------------------------------------------- metrics


class Metrics:
    """Counters and a latency histogram rendered in the Prometheus text format.

    Hand-written rather than ``prometheus_client`` to avoid a dependency for ~40 lines; the
    exposition format is stable and simple.
    """

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.hist: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.tokens = 0
        self.batches = 0
        self.batched_jobs = 0

    def observe(self, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            counts = self.hist.setdefault(path, [0] * (len(self.BUCKETS) + 1))
            counts[bisect.bisect_left(self.BUCKETS, seconds)] += 1
            self.sums[path] = self.sums.get(path, 0.0) + seconds

    def add_tokens(self, n: int) -> None:
        with self._lock:
            self.tokens += n

    def add_batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.batched_jobs += size

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP cadence_requests_total HTTP requests by path and status.",
                "# TYPE cadence_requests_total counter",
            ]
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'cadence_requests_total{{path="{path}",status="{status}"}} {n}')
            lines += [
                "# HELP cadence_request_latency_seconds Time to the response headers.",
                "# TYPE cadence_request_latency_seconds histogram",
            ]
            for path, counts in sorted(self.hist.items()):
                cum = 0
                for bound, c in zip([*self.BUCKETS, float("inf")], counts):
                    cum += c
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    lines.append(
                        f'cadence_request_latency_seconds_bucket{{path="{path}",le="{le}"}} {cum}'
                    )
                lines.append(
                    f'cadence_request_latency_seconds_sum{{path="{path}"}} {self.sums[path]}'
                )
                lines.append(f'cadence_request_latency_seconds_count{{path="{path}"}} {cum}')
            lines += [
                "# HELP cadence_tokens_generated_total Tokens generated by /v1/generate.",
                "# TYPE cadence_tokens_generated_total counter",
                f"cadence_tokens_generated_total {self.tokens}",
                "# HELP cadence_batches_total Forward batches run by the engine.",
                "# TYPE cadence_batches_total counter",
                f"cadence_batches_total {self.batches}",
                "# HELP cadence_batched_jobs_total Jobs run in those batches.",
                "# TYPE cadence_batched_jobs_total counter",
                f"cadence_batched_jobs_total {self.batched_jobs}",
            ]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- engine


@dataclass
class Job:
    """One request's work; ``emit`` is called from the engine thread."""

    kind: str  # "generate" | "predict"
    emit: Callable[[str, Any], None]
    prompt: list[int] = field(default_factory=list)
    params: SamplingParams | None = None
    inputs: torch.Tensor | None = None


class Engine:
    """The thread that owns the model and batches concurrent jobs."""

    def __init__(self, run: LoadedRun, settings: ServeSettings, metrics: Metrics) -> None:
        self.run = run
        self.settings = settings
        self.metrics = metrics
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="cadence-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _fits(self, job: Job) -> bool:
        assert job.params is not None
        return len(job.prompt) + job.params.max_new_tokens <= self.run.seq_len

    def _gather(self, first: Job) -> tuple[list[Job], list[Job]]:
        """``first`` plus compatible jobs arriving within the wait; the rest is deferred."""
        batch, later = [first], []
        deadline = time.perf_counter() + self.settings.batch_wait_s
        while len(batch) < self.settings.max_batch:
            timeout = deadline - time.perf_counter()
            try:
                job = (
                    self._queue.get(timeout=max(timeout, 0))
                    if timeout > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if job is None:
                later.append(job)  # type: ignore[arg-type]
                break
            ok = job.kind == first.kind and (job.kind == "predict" or self._fits(job))
            (batch if ok else later).append(job)
        return batch, later

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        pending: list[Job | None] = []
        while True:
            job = pending.pop(0) if pending else self._queue.get()
            if job is None:
                return
            if job.kind == "generate" and not self._fits(job):
                batch, later = [job], []
            else:
                batch, later = self._gather(job)
            pending.extend(later)
            self.metrics.add_batch(len(batch))
            try:
                if job.kind == "predict":
                    self._predict(batch)
                elif len(batch) == 1:
                    self._generate_one(batch[0])
                else:
                    self._generate_many(batch)
            except Exception as exc:  # never let one bad batch stop the engine
                for j in batch:
                    j.emit("error", f"{type(exc).__name__}: {exc}")

    def _predict(self, batch: list[Job]) -> None:
        x = torch.cat([j.inputs for j in batch])  # type: ignore[misc]
        logits = self.run.model(x)
        if self.run.config.workload == "logreg":
            p1 = torch.sigmoid(logits.double())
            probs = torch.stack([1 - p1, p1], dim=-1)
        else:
            probs = torch.softmax(logits.double(), dim=-1)
        start = 0
        for j in batch:
            n = j.inputs.shape[0]  # type: ignore[union-attr]
            j.emit("result", probs[start : start + n].tolist())
            start += n

    def _generate_one(self, job: Job) -> None:
        assert job.params is not None
        for tok in generate(self.run.model, job.prompt, job.params):  # type: ignore[arg-type]
            job.emit("token", tok)
        job.emit("done", None)

    def _generate_many(self, batch: list[Job]) -> None:
        prompts = [j.prompt for j in batch]
        params = [j.params for j in batch]
        for step in generate_batch(self.run.model, prompts, params):  # type: ignore[arg-type]
            for j, tok in zip(batch, step):
                if tok is not None:
                    j.emit("token", tok)
        for j in batch:
            j.emit("done", None)


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
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.middleware("http")
    async def _auth_and_metrics(request: Request, call_next: Callable) -> Response:
        start = time.perf_counter()
        path = request.url.path
        if settings.api_key and path != "/health":
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
                response: Response = JSONResponse(
                    {"error": "authorization: missing or wrong bearer token"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                metrics.observe(path, 401, time.perf_counter() - start)
                return response
        response = await call_next(request)
        known = {"/v1/generate", "/v1/predict", "/health", "/metrics"}
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

    @app.post("/v1/predict", openapi_extra=body_doc)
    async def predict(request: Request) -> dict[str, Any]:
        body: PredictRequest = await _parse_body(request, PredictRequest)
        if run.kind != "classifier":
            raise HTTPError(400, "model: this server holds a language model; use /v1/generate")
        if len(body.inputs) > settings.max_predict_inputs:
            raise HTTPError(
                413,
                f"inputs: {len(body.inputs)} examples, the limit is {settings.max_predict_inputs}",
            )
        x = _predict_tensor(run, body.inputs)
        _, events = _run_job({"kind": "predict", "inputs": x})
        kind, value = await events.get()
        if kind == "error":
            raise HTTPError(500, f"model: {value}")
        classes = 2 if run.config.workload == "logreg" else len(value[0])
        return {
            "probabilities": value,
            "labels": [int(np.argmax(p)) for p in value],
            "classes": list(range(classes)),
        }

    @app.post("/v1/generate", response_model=None, openapi_extra=body_doc)
    async def generate_endpoint(request: Request) -> dict[str, Any] | StreamingResponse:
        body: GenerateRequest = await _parse_body(request, GenerateRequest)
        if run.kind != "lm":
            raise HTTPError(
                400, f"model: this server holds a {run.config.workload} classifier; use /v1/predict"
            )
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
        _, events = _run_job({"kind": "generate", "prompt": prompt, "params": params})
        decoder = StreamDecoder(run.tokenizer)
        tokens: list[int] = []

        def summary() -> dict[str, Any]:
            return {
                "text": run.tokenizer.decode(tokens),  # type: ignore[union-attr]
                "tokens": tokens,
                "prompt_tokens": len(prompt),
                "completion_tokens": len(tokens),
                "finish_reason": "length",
            }

        if not body.stream:
            while True:
                kind, value = await events.get()
                if kind == "token":
                    tokens.append(value)
                elif kind == "done":
                    metrics.add_tokens(len(tokens))
                    return summary()
                else:
                    raise HTTPError(500, f"model: {value}")

        async def sse() -> AsyncIterator[str]:
            while True:
                kind, value = await events.get()
                if kind == "token":
                    tokens.append(value)
                    piece = decoder.push(value)
                    yield f"data: {json.dumps({'token': value, 'text': piece})}\n\n"
                elif kind == "done":
                    metrics.add_tokens(len(tokens))
                    tail = decoder.flush()
                    if tail:
                        yield f"data: {json.dumps({'token': None, 'text': tail})}\n\n"
                    yield f"event: done\ndata: {json.dumps(summary())}\n\n"
                    return
                else:
                    yield f"event: error\ndata: {json.dumps({'error': f'model: {value}'})}\n\n"
                    return

        return StreamingResponse(sse(), media_type="text/event-stream")

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
