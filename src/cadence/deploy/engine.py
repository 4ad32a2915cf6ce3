"""The batching generation engine behind the HTTP server: the one thread that owns the model.

It lives apart from the app (:mod:`cadence.deploy.serve`) because it is the model side of the
server: it knows nothing of HTTP, only of jobs and the callback each one reports through.

Concurrency model. Request handlers are async and never touch the model; they put a job on a
queue and await its results. One engine thread owns the model: it takes the first waiting job,
gathers the others that arrive within ``batch_wait_s`` (up to ``max_batch``) and runs them as one
forward pass — stacked inputs for classifiers, left-padded rows with a shared KV cache for
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
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cadence.deploy.logprobs import score_rows
from cadence.deploy.rundir import LoadedRun
from cadence.deploy.serve_metrics import Metrics
from cadence.models.generate import SamplingParams, generate, generate_batch

if TYPE_CHECKING:  # serve.py imports this module; the settings are only read as attributes
    from cadence.deploy.serve import ServeSettings

__all__ = ["Engine", "Job"]


@dataclass
class Job:
    """One request's work; ``emit`` is called from the engine thread."""

    kind: str  # "generate" | "score" | "predict" | "transcribe"
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

    def _fits(self, job: Job) -> bool:
        assert job.params is not None
        return len(job.prompt) + job.params.max_new_tokens <= self.run.seq_len

    def _compatible(self, first: Job, job: Job) -> bool:
        """Whether ``job`` can share ``first``'s forward pass (same kind already checked)."""
        if job.kind == "generate":
            return self._fits(job)
        if job.kind == "transcribe":  # clips are concatenated: the same length only
            return job.inputs.shape[1:] == first.inputs.shape[1:]  # type: ignore[union-attr]
        return True

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
            ok = job.kind == first.kind and self._compatible(first, job)
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
            live = []
            for j in batch:
                if j.cancelled:  # cancelled while queued: nothing to run
                    j.emit("done", None)
                else:
                    live.append(j)
            if not live:
                continue
            batch = live
            self.metrics.add_batch(len(batch))
            try:
                if job.kind == "predict":
                    self._predict(batch)
                elif job.kind == "score":
                    self._score(batch)
                elif job.kind == "transcribe":
                    self._transcribe(batch)
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

    def _score(self, batch: list[Job]) -> None:
        """Token sequences scored together (deploy/logprobs.py); each fits the context."""
        scored = score_rows(self.run.model, [j.prompt for j in batch], max(j.top for j in batch))
        for j, result in zip(batch, scored):
            j.emit("result", result)

    def _transcribe(self, batch: list[Job]) -> None:
        from cadence.models.asr import decode_ids, greedy_decode

        x = torch.cat([j.inputs for j in batch])  # type: ignore[misc]
        log_probs = self.run.model(x)
        frames = torch.full((x.shape[0],), log_probs.shape[1], dtype=torch.int64)
        texts = [decode_ids(ids) for ids in greedy_decode(log_probs, frames)]
        start = 0
        for j in batch:
            n = j.inputs.shape[0]  # type: ignore[union-attr]
            j.emit("result", texts[start : start + n])
            start += n

    def _generate_one(self, job: Job) -> None:
        assert job.params is not None
        tokens = generate(self.run.model, job.prompt, job.params)  # type: ignore[arg-type]
        with closing(tokens):
            for tok in tokens:
                job.emit("token", tok)
                if job.cancelled:
                    break
        job.emit("done", None)

    def _generate_many(self, batch: list[Job]) -> None:
        prompts = [j.prompt for j in batch]
        params = [j.params for j in batch]
        steps = generate_batch(self.run.model, prompts, params)  # type: ignore[arg-type]
        with closing(steps):
            for i, step in enumerate(steps):
                for j, tok in zip(batch, step):
                    if tok is not None and not j.cancelled:
                        j.emit("token", tok)
                # Stop before the next forward once no row wants another token.
                if all(j.cancelled or i + 1 >= j.params.max_new_tokens for j in batch):  # type: ignore[union-attr]
                    break
        for j in batch:
            j.emit("done", None)
