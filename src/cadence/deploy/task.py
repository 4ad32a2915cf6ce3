"""What each kind of model brings to serving and export: the contract of :mod:`cadence.deploy.kinds`.

A kind (language model, classifier, speech recogniser) is one :class:`Task`: the routes it
serves, the engine work behind them (:class:`cadence.deploy.engine.Work`), and the inputs and
outputs its exported graphs take and give. The app (:mod:`cadence.deploy.serve`) and the
exporter (:mod:`cadence.deploy.export`) ask the run's task and never switch on the kind
themselves, so a new kind is one module and one registry line.

The routes a task mounts share :class:`ServeContext` (the run, the limits, the metrics and the
way to put a job on the engine) and the errors people read: :class:`HTTPError` and strict body
parsing (a wrong type is a 422 naming the field) for cadence's own endpoints.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from cadence.deploy.engine import Engine, Job, ServeSettings, Work
from cadence.deploy.rundir import LoadedRun
from cadence.deploy.serve_metrics import Metrics
from cadence.workloads import ModelKind

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

__all__ = ["Graph", "HTTPError", "InvalidBody", "ServeContext", "Task", "parse_strict"]

# An exported graph as a function: a batch in, the first output as an array (ONNX Runtime).
Graph = Callable[[torch.Tensor], np.ndarray]


class HTTPError(Exception):
    """Raised by handlers; rendered as ``{"error": message}`` with the status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class InvalidBody(Exception):
    """A body that does not validate; rendered as a 422 naming the first bad field."""

    def __init__(self, errors: list[Any]) -> None:
        super().__init__("invalid request")
        self.errors = errors


Body = TypeVar("Body", bound=BaseModel)


async def parse_strict(request: Request, model: type[Body]) -> Body:
    """Validate the raw body as JSON whatever the Content-Type says.

    ``curl -d`` sends form encoding by default; refusing that would only confuse people, and
    parsing the bytes ourselves also reports malformed JSON the same way as a wrong field.
    """
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        raise InvalidBody(exc.errors()) from None


@dataclass
class ServeContext:
    """What a task's routes work with; ``engine`` is set while the app runs (its lifespan)."""

    run: LoadedRun
    settings: ServeSettings
    metrics: Metrics
    engine: Engine | None = field(default=None, repr=False)

    def submit(self, work: Work, **fields: Any) -> tuple[Job, asyncio.Queue]:
        """Put a job on the engine; its events (``(kind, value)``) arrive on the queue, in the
        event loop of the caller."""
        if self.engine is None:
            raise RuntimeError("the engine runs only while the app does (its lifespan)")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = Job(work=work, emit=emit, **fields)
        self.engine.submit(job)
        return job, events

    async def result(self, work: Work, **fields: Any) -> Any:
        """Run one job that answers with one ``result``; an engine error is a 500."""
        _, events = self.submit(work, **fields)
        kind, value = await events.get()
        if kind != "result":
            raise HTTPError(500, f"model: {value}")
        return value


class Task(ABC):
    """One kind of model: its routes, its engine work, its export inputs and outputs."""

    kind: ClassVar[ModelKind]
    endpoint: ClassVar[str]  # the route named when a request goes to another kind's route
    routes: ClassVar[tuple[tuple[str, str], ...]]  # (method, path) pairs it serves
    openai_paths: ClassVar[frozenset[str]] = frozenset()  # errors in OpenAI's shape
    formats: ClassVar[tuple[str, ...]] = ("safetensors", "onnx")  # export formats it has
    input_name: ClassVar[str] = "inputs"
    output_name: ClassVar[str] = "logits"
    val_examples: ClassVar[int] = 2048  # validation examples a quantised graph is scored on

    @abstractmethod
    def mount(self, app: FastAPI, ctx: ServeContext) -> None:
        """Register this kind's routes (and the engine work they submit) on ``app``."""

    @abstractmethod
    def sample_inputs(self, run: LoadedRun, seed: int) -> list[torch.Tensor]:
        """Inputs of several shapes that exported models are checked on."""

    def dynamic_dims(self, run: LoadedRun) -> dict[int, Any]:
        """The input's dimensions beyond the batch that an exported graph leaves free."""
        return {}

    @abstractmethod
    def input_spec(self, run: LoadedRun) -> dict[str, Any]:
        """The exported input as ``export.json`` states it: name, dtype, shape."""

    @abstractmethod
    def quantized_quality(
        self, run: LoadedRun, workload: Any, n: int, graphs: dict[str, Graph]
    ) -> dict[str, float]:
        """The validation quality of each graph (``fp32``, ``int8``) on ``n`` examples, and
        the change from one to the other."""
