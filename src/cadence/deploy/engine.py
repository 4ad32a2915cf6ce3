"""The batching generation engine behind the HTTP server: the one thread that owns the model.

It lives apart from the app (:mod:`cadence.deploy.serve`) because it is the model side of the
server: it knows nothing of HTTP, only of jobs and the callback each one reports through. What a
job computes is its :class:`Work`, which each kind of model brings (:mod:`cadence.deploy.kinds`):
the engine only decides which jobs run together, and never what they are.

Concurrency model. Request handlers are async and never touch the model; they put a job on a
queue and await its results. One engine thread owns the model: it takes the first waiting job,
gathers the others of the same work that arrive within ``batch_wait_s`` (up to ``max_batch``;
jobs of other work wait for the next turn) and runs them as one forward pass — stacked inputs for classifiers, left-padded rows with a shared KV cache for
language models (:func:`cadence.models.generate.generate_batch`), right-padded rows for
sequences to score (:func:`cadence.deploy.logprobs.score_rows`). A generation that would slide
its context window runs alone, since rows of a batch cannot slide at different steps. Tokens are
handed back to the event loop as they are produced, which is what streaming (server-sent events)
sends.

Cancellation. A handler that needs no more tokens (a stop string or the end-of-sequence token
was generated, or the client went away) calls :meth:`Job.cancel`. The engine checks the flag
between tokens: a cancelled job gets no further tokens, a job cancelled while still queued never
runs, and a batch stops stepping once none of its rows wants another token. Every job still ends
with one ``done`` (or ``error``) event.
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cadence.deploy.rundir import LoadedRun
from cadence.deploy.serve_metrics import Metrics
from cadence.models.generate import SamplingParams

__all__ = ["Engine", "Job", "ServeSettings", "Work"]


@dataclass
class ServeSettings:
    """Server limits; the defaults suit a CPU box."""

    max_new_tokens_limit: int = 512  # larger requests get 400
    max_batch: int = 16  # jobs per forward pass
    batch_wait_s: float = 0.005  # how long the engine waits to fill a batch
    max_predict_inputs: int = 1024  # examples per /v1/predict request
    max_prompts: int = 64  # prompts per /v1/completions request
    api_key: str | None = None  # bearer token required on every endpoint but /health


class Work(ABC):
    """One kind of work on the model: which jobs may share a forward pass, and the pass.

    A kind of model defines one subclass per job it serves (generate, score, predict, ...);
    the engine batches jobs whose ``work`` is the same object.
    """

    def alone(self, job: Job) -> bool:
        """Whether ``job`` must run in a batch of its own."""
        return False

    def joins(self, first: Job, job: Job) -> bool:
        """Whether ``job`` can share ``first``'s forward pass (both of this work)."""
        return True

    @abstractmethod
    def compute(self, batch: list[Job]) -> None:
        """Compute the batch and report through each job's ``emit`` (engine thread)."""


@dataclass
class Job:
    """One request's work; ``emit`` is called from the engine thread."""

    work: Work
    emit: Callable[[str, Any], None]
    prompt: list[int] = field(default_factory=list)
    params: SamplingParams | None = None
    inputs: torch.Tensor | None = None
    top: int = 0  # score: the most likely next tokens to report per position
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Ask the engine for no more tokens; safe from any thread, and to call twice."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


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
            work = first.work
            ok = job.work is work and not work.alone(job) and work.joins(first, job)
            (batch if ok else later).append(job)
        return batch, later

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        pending: list[Job | None] = []
        while True:
            job = pending.pop(0) if pending else self._queue.get()
            if job is None:
                return
            batch, later = ([job], []) if job.work.alone(job) else self._gather(job)
            pending.extend(later)
            live = []
            for j in batch:
                if j.cancelled:  # cancelled while queued: nothing to run
                    j.emit("done", None)
                else:
                    live.append(j)
            if not live:
                continue
            self.metrics.add_batch(len(live))
            try:
                job.work.compute(live)
            except Exception as exc:  # never let one bad batch stop the engine
                for j in live:
                    j.emit("error", f"{type(exc).__name__}: {exc}")
