"""Language models: generation, scoring and chat over HTTP, and their exports.

Routes: cadence's own ``POST /v1/generate`` (here), OpenAI's ``/v1/completions``
(:mod:`cadence.deploy.completions_api`), ``/v1/chat/completions`` and ``/v1/models``
(:mod:`cadence.deploy.chat_api`) and vLLM's tokenizer endpoints
(:mod:`cadence.deploy.tokenizer_api`). Two kinds of engine work serve them all: generation
(left-padded rows sharing a KV cache, :func:`cadence.models.generate.generate_batch`) and
scoring (right-padded rows in one forward pass, :mod:`cadence.deploy.logprobs`); the routes
reach them through :class:`LMJobs`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import closing
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cadence.deploy.chat_api import CHAT_PATH, MODELS_PATH, add_chat
from cadence.deploy.completions_api import add_completions
from cadence.deploy.engine import Job, Work
from cadence.deploy.logprobs import Scored, score_rows
from cadence.deploy.openai_api import (
    COMPLETIONS_PATH,
    JSON_BODY,
    MAX_STOP,
    Completion,
    CompletionText,
    ModelError,
    eos_token_id,
)
from cadence.deploy.rundir import LoadedRun
from cadence.deploy.task import Graph, HTTPError, ServeContext, Task, parse_strict
from cadence.deploy.tokenizer_api import TOKENIZER_PATHS, add_tokenizer
from cadence.models.generate import SamplingParams, generate, generate_batch
from cadence.workloads import ModelKind

__all__ = ["GenerateRequest", "LMJobs", "LanguageModelTask"]


class GenerateWork(Work):
    """Prompts generated together; one that would slide its context window runs alone, since
    rows of a batch cannot slide at different steps."""

    def __init__(self, run: LoadedRun) -> None:
        self.run = run

    def alone(self, job: Job) -> bool:
        assert job.params is not None
        return len(job.prompt) + job.params.max_new_tokens > self.run.seq_len

    def compute(self, batch: list[Job]) -> None:
        if len(batch) == 1:
            self._one(batch[0])
            return
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

    def _one(self, job: Job) -> None:
        assert job.params is not None
        tokens = generate(self.run.model, job.prompt, job.params)
        with closing(tokens):
            for tok in tokens:
                job.emit("token", tok)
                if job.cancelled:
                    break
        job.emit("done", None)


class ScoreWork(Work):
    """Token sequences scored together (deploy/logprobs.py); each fits the context."""

    def __init__(self, run: LoadedRun) -> None:
        self.run = run

    def compute(self, batch: list[Job]) -> None:
        scored = score_rows(self.run.model, [j.prompt for j in batch], max(j.top for j in batch))
        for j, result in zip(batch, scored):
            j.emit("result", result)


class LMJobs:
    """How a language model's routes use the engine: completions and scoring."""

    def __init__(self, ctx: ServeContext) -> None:
        self.ctx = ctx
        self._generate = GenerateWork(ctx.run)
        self._score = ScoreWork(ctx.run)

    def completion(
        self, prompt: list[int], params: SamplingParams, text: CompletionText
    ) -> Completion:
        """A generate job on the engine, read as text (:class:`Completion`)."""
        job, events = self.ctx.submit(self._generate, prompt=prompt, params=params)
        return Completion(job, events, self.ctx.metrics, text)

    async def score(self, sequence: list[int], top: int) -> Scored:
        """One token sequence scored on the engine (:mod:`cadence.deploy.logprobs`)."""
        _, events = self.ctx.submit(self._score, prompt=sequence, top=top)
        kind, value = await events.get()
        if kind != "result":
            raise ModelError(str(value))
        return value


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


def add_generate(app: FastAPI, ctx: ServeContext, lm: LMJobs) -> None:
    """``POST /v1/generate``: cadence's own text generation, whole or streamed (SSE)."""
    run, settings = ctx.run, ctx.settings

    @app.post("/v1/generate", response_model=None, openapi_extra=JSON_BODY)
    async def generate_endpoint(request: Request) -> dict[str, Any] | StreamingResponse:
        body = await parse_strict(request, GenerateRequest)
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
        completion = lm.completion(prompt, params, text)

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


class LanguageModelTask(Task):
    kind = ModelKind.LM
    endpoint = "/v1/generate"
    openai_paths = frozenset({COMPLETIONS_PATH, CHAT_PATH, MODELS_PATH, *TOKENIZER_PATHS})
    routes = (
        ("POST", "/v1/generate"),
        ("POST", COMPLETIONS_PATH),
        ("POST", CHAT_PATH),
        ("GET", MODELS_PATH),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("GET", "/tokenizer_info"),
    )
    formats = ("safetensors", "onnx", "hf", "peft")
    input_name = "idx"
    val_examples = 64

    def mount(self, app: FastAPI, ctx: ServeContext) -> None:
        lm = LMJobs(ctx)
        add_generate(app, ctx, lm)
        add_completions(app, ctx, lm)
        add_chat(app, ctx, lm)
        add_tokenizer(app, ctx.run)

    def sample_inputs(self, run: LoadedRun, seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        v, t = run.tokenizer.vocab_size, run.seq_len  # type: ignore[union-attr]
        shapes = [(1, 1), (3, max(1, t // 2 + 1)), (2, t)]
        return [torch.randint(0, v, s, generator=g) for s in shapes]

    def dynamic_dims(self, run: LoadedRun) -> dict[int, Any]:
        from torch.export import Dim

        # The rotary table covers seq_len positions; the graph is valid up to that length.
        return {1: Dim("seq", min=1, max=run.seq_len)}

    def input_spec(self, run: LoadedRun) -> dict[str, Any]:
        return {
            "name": self.input_name,
            "dtype": "int64",
            "shape": ["batch", f"seq<={run.seq_len}"],
        }

    def quantized_quality(
        self, run: LoadedRun, workload: Any, n: int, graphs: dict[str, Graph]
    ) -> dict[str, float]:
        blocks = workload.val_blocks(n).cpu()  # windows spread as in evaluation
        x, y = blocks[:, :-1], blocks[:, 1:]
        report: dict[str, float] = {}
        for label, graph in graphs.items():
            logits = torch.from_numpy(graph(x))
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            report[f"val_loss_{label}"] = float(loss)
        report["val_loss_change"] = report["val_loss_int8"] - report["val_loss_fp32"]
        return report
