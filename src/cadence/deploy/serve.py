"""HTTP serving of a run: the FastAPI app around the run's kind of model.

What is served depends on the kind (:mod:`cadence.deploy.kinds`: a language model's
generation, OpenAI and tokenizer routes; a classifier's ``/v1/predict``; a speech recogniser's
``/v1/transcribe``); the app here holds what every server shares: the engine's lifetime
(:mod:`cadence.deploy.engine`: one thread owns the model and batches concurrent requests), bearer
auth, Prometheus metrics (:mod:`cadence.deploy.serve_metrics`), ``/health``, and the rendering of
errors. Request handlers are async and never touch the model; they put a job on the engine's
queue and await its results, which is also what streaming (server-sent events) sends.

Errors are for people: a body that does not validate gets 422 naming the field; a prompt over
the context gets 413 and ``max_new_tokens`` over the limit 400, both naming the limit; a request
to another kind's route (asking a classifier to generate) gets 400 naming the route to use. None
of them disturbs the engine, so the server keeps serving. OpenAI's routes say the same in
OpenAI's error shape.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from cadence.deploy.audio_api import AudioError
from cadence.deploy.engine import Engine, ServeSettings
from cadence.deploy.kinds import TASKS, task_for
from cadence.deploy.openai_api import OpenAIError, openai_error
from cadence.deploy.rundir import LoadedRun
from cadence.deploy.serve_metrics import Metrics
from cadence.deploy.task import HTTPError, InvalidBody, ServeContext, Task

__all__ = ["API_KEY_ENV", "ServeSettings", "create_app", "serve"]

API_KEY_ENV = "CADENCE_API_KEY"
# errors in OpenAI's shape, whichever kind the server holds
OPENAI_PATHS = frozenset().union(*(task.openai_paths for task in TASKS.values()))
KNOWN_PATHS = frozenset({"/health", "/metrics"}).union(
    *({path for _, path in task.routes} for task in TASKS.values())
)


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


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(list(exc.errors()))

    @app.exception_handler(InvalidBody)
    async def _invalid_body(request: Request, exc: InvalidBody) -> JSONResponse:
        return _validation_response(exc.errors)

    @app.exception_handler(HTTPError)
    @app.exception_handler(AudioError)
    async def _http_error(request: Request, exc: HTTPError | AudioError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)


def _refusal(message: str, openai: bool) -> Callable:
    async def refuse() -> None:
        if openai:
            raise OpenAIError(400, message, param="model")
        raise HTTPError(400, message)

    return refuse


def _refuse_other_kinds(app: FastAPI, run: LoadedRun, task: Task) -> None:
    """Another kind's routes answer 400 naming the route this server has, not a bare 404."""
    message = f"model: this server holds {run.what}; use {task.endpoint}"
    own = set(task.routes)
    for other in TASKS.values():
        for method, path in other.routes:
            if (method, path) not in own:
                refuse = _refusal(message, path in OPENAI_PATHS)
                app.add_api_route(path, refuse, methods=[method], include_in_schema=False)


def _auth_and_metrics(settings: ServeSettings, metrics: Metrics) -> Callable:
    async def middleware(request: Request, call_next: Callable) -> Response:
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
                headers = {"WWW-Authenticate": "Bearer"}
                metrics.observe(path, 401, time.perf_counter() - start)
                return JSONResponse(error, status_code=401, headers=headers)
        response = await call_next(request)
        known = path if path in KNOWN_PATHS else "other"
        metrics.observe(known, response.status_code, time.perf_counter() - start)
        return response

    return middleware


def create_app(run: LoadedRun, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``run``; the engine thread starts with the app and stops with it."""
    ctx = ServeContext(run, settings or ServeSettings(), Metrics())
    task = task_for(run)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx.engine = Engine(run, ctx.settings, ctx.metrics)
        yield
        ctx.engine.close()

    summary = f"{run.config.workload} {run.kind.noun} from {run.path}"
    app = FastAPI(title="cadence", summary=summary, lifespan=lifespan)
    _add_error_handlers(app)
    app.middleware("http")(_auth_and_metrics(ctx.settings, ctx.metrics))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        auth = bool(ctx.settings.api_key)
        return {"status": "ok", "workload": run.config.workload, "kind": run.kind, "auth": auth}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    task.mount(app, ctx)
    _refuse_other_kinds(app, run, task)
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
