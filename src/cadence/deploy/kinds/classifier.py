"""Classifiers (mnist, digits, logreg, speech commands): ``POST /v1/predict`` and their exports.

A request holds examples as JSON numbers (a flat list or the model's input shape), or, for the
speech classifier, a WAV upload or base64 PCM (:mod:`cadence.deploy.audio_api`); concurrent
requests are stacked into one forward pass on the engine. The answer is the class
probabilities, the most likely labels and, where the run has them, the class names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from cadence.deploy.audio_api import UPLOAD_CONTENT, is_upload, read_audio, wants_pcm
from cadence.deploy.engine import Job, Work
from cadence.deploy.rundir import LoadedRun
from cadence.deploy.task import Graph, HTTPError, ServeContext, Task, parse_strict
from cadence.workloads import ModelKind

__all__ = ["INPUT_SHAPES", "ClassifierTask", "PredictRequest"]

# Per-example input shape each classifier workload's model expects (a flat list is accepted too).
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "mnist": (1, 28, 28),
    "digits": (64,),
    "logreg": (30,),
    "speech": (16_000,),  # one second of 16 kHz audio; uploads are cut or padded to it
}
AUDIO = frozenset({"speech"})  # classifiers of raw 16 kHz audio, of any length once exported

PREDICT_DOC = {
    "requestBody": {"required": True, "content": {"application/json": {}, **UPLOAD_CONTENT}}
}


class PredictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    # One example is a flat list of numbers, or nested lists of the model's input shape.
    inputs: list[list[Any]] = Field(min_length=1)


class PredictWork(Work):
    """Examples stacked into one forward pass; probabilities back per request."""

    def __init__(self, run: LoadedRun) -> None:
        self.run = run
        self.binary = run.config.workload == "logreg"  # one logit: P(class 1) is its sigmoid

    def compute(self, batch: list[Job]) -> None:
        x = torch.cat([j.inputs for j in batch])  # type: ignore[misc]
        logits = self.run.model(x)
        if self.binary:
            p1 = torch.sigmoid(logits.double())
            probs = torch.stack([1 - p1, p1], dim=-1)
        else:
            probs = torch.softmax(logits.double(), dim=-1)
        start = 0
        for j in batch:
            n = j.inputs.shape[0]  # type: ignore[union-attr]
            j.emit("result", probs[start : start + n].tolist())
            start += n


def predict_tensor(run: LoadedRun, inputs: list[list[Any]]) -> torch.Tensor:
    """JSON examples as one batch of the model's input shape, or a 422 naming the example."""
    shape = INPUT_SHAPES[run.config.workload]
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


class ClassifierTask(Task):
    kind = ModelKind.CLASSIFIER
    endpoint = "/v1/predict"
    routes = (("POST", "/v1/predict"),)

    def mount(self, app: FastAPI, ctx: ServeContext) -> None:
        run, settings, work = ctx.run, ctx.settings, PredictWork(ctx.run)

        async def examples(request: Request) -> torch.Tensor:
            if is_upload(request) or await wants_pcm(request):
                if run.config.workload not in AUDIO:
                    raise HTTPError(
                        415, f"file: the {run.config.workload} model takes JSON inputs, not audio"
                    )
                from cadence.data.speech import fit_clip

                return torch.from_numpy(fit_clip(await read_audio(request)))[None].to(run.dtype)
            body = await parse_strict(request, PredictRequest)
            if len(body.inputs) > settings.max_predict_inputs:
                raise HTTPError(
                    413,
                    f"inputs: {len(body.inputs)} examples, the limit is "
                    f"{settings.max_predict_inputs}",
                )
            return predict_tensor(run, body.inputs)

        @app.post("/v1/predict", openapi_extra=PREDICT_DOC)
        async def predict(request: Request) -> dict[str, Any]:
            probs = await ctx.result(work, inputs=await examples(request))
            labels = [int(np.argmax(p)) for p in probs]
            out: dict[str, Any] = {
                "probabilities": probs,
                "labels": labels,
                "classes": list(range(len(probs[0]))),
            }
            if run.labels is not None:  # the names the indices stand for ("yes", "two", ...)
                out["names"] = [run.labels[i] for i in labels]
                out["class_names"] = run.labels
            return out

    def sample_inputs(self, run: LoadedRun, seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        if run.config.workload in AUDIO:  # audio-scale noise, at two clip lengths
            return [0.1 * torch.randn(s, generator=g) for s in ((1, 16_000), (5, 11_000))]
        shape = INPUT_SHAPES[run.config.workload]
        return [torch.randn((b, *shape), generator=g, dtype=run.dtype) for b in (1, 5)]

    def dynamic_dims(self, run: LoadedRun) -> dict[int, Any]:
        if run.config.workload not in AUDIO:
            return {}
        from torch.export import Dim

        # Any clip length: the model pools over time. The STFT's reflect padding needs more
        # than n_fft / 2 samples; the top is read_wav's 60 s cap.
        return {1: Dim("samples", min=512, max=60 * 16_000)}

    def input_spec(self, run: LoadedRun) -> dict[str, Any]:
        shape = ["samples"] if run.config.workload in AUDIO else INPUT_SHAPES[run.config.workload]
        dtype = str(run.dtype).removeprefix("torch.")
        return {"name": self.input_name, "dtype": dtype, "shape": ["batch", *shape]}

    def quantized_quality(
        self, run: LoadedRun, workload: Any, n: int, graphs: dict[str, Graph]
    ) -> dict[str, float]:
        x = workload.inputs(workload.x_val[:n]).cpu()
        x = x.reshape(n, *INPUT_SHAPES[run.config.workload])
        y = workload.y_val[:n].cpu()
        report: dict[str, float] = {}
        for label, graph in graphs.items():
            logits = torch.from_numpy(graph(x))
            report[f"val_loss_{label}"] = float(torch.nn.functional.cross_entropy(logits, y))
            report[f"val_accuracy_{label}"] = float((logits.argmax(-1) == y).float().mean())
        report["val_loss_change"] = report["val_loss_int8"] - report["val_loss_fp32"]
        report["val_accuracy_change"] = report["val_accuracy_int8"] - report["val_accuracy_fp32"]
        return report
