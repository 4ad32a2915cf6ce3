"""Speech recognisers (the asr workload): ``POST /v1/transcribe`` and their exports.

A request is a WAV upload or base64 PCM (:mod:`cadence.deploy.audio_api`), padded to the
training clip; clips of the same length from concurrent requests share one forward pass and
are decoded greedily (CTC). Exported graphs take raw 16 kHz audio of any length and give the
per-frame CTC log-probabilities.
"""

from __future__ import annotations

from typing import Any

import torch
from fastapi import FastAPI, Request

from cadence.deploy.audio_api import UPLOAD_CONTENT, read_audio
from cadence.deploy.engine import Job, Work
from cadence.deploy.rundir import LoadedRun
from cadence.deploy.task import Graph, ServeContext, Task
from cadence.workloads import ModelKind

__all__ = ["SpeechRecognitionTask"]

UPLOAD_DOC = {"requestBody": {"required": True, "content": UPLOAD_CONTENT}}


class TranscribeWork(Work):
    """Clips concatenated into one forward pass, decoded greedily."""

    def __init__(self, run: LoadedRun) -> None:
        self.run = run

    def joins(self, first: Job, job: Job) -> bool:
        return job.inputs.shape[1:] == first.inputs.shape[1:]  # type: ignore[union-attr]

    def compute(self, batch: list[Job]) -> None:
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


class SpeechRecognitionTask(Task):
    kind = ModelKind.ASR
    endpoint = "/v1/transcribe"
    routes = (("POST", "/v1/transcribe"),)
    output_name = "log_probs"  # CTC log-probabilities per frame

    def mount(self, app: FastAPI, ctx: ServeContext) -> None:
        run, work = ctx.run, TranscribeWork(ctx.run)

        @app.post("/v1/transcribe", openapi_extra=UPLOAD_DOC)
        async def transcribe(request: Request) -> dict[str, Any]:
            from cadence.data.digit_strings import pad_to_clip

            x = torch.from_numpy(pad_to_clip(await read_audio(request)))[None].to(run.dtype)
            texts = await ctx.result(work, inputs=x)
            return {"text": texts[0], "seconds": round(x.shape[1] / 16_000, 3)}

    def sample_inputs(self, run: LoadedRun, seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)  # audio-scale noise, at two clip lengths
        return [0.1 * torch.randn(s, generator=g) for s in ((1, 32_000), (3, 20_000))]

    def dynamic_dims(self, run: LoadedRun) -> dict[int, Any]:
        from torch.export import Dim

        # Any clip length: the encoder is convolutional over time. The STFT's reflect padding
        # needs more than n_fft / 2 samples; the top is read_wav's 60 s cap.
        return {1: Dim("samples", min=512, max=60 * 16_000)}

    def input_spec(self, run: LoadedRun) -> dict[str, Any]:
        dtype = str(run.dtype).removeprefix("torch.")
        return {"name": self.input_name, "dtype": dtype, "shape": ["batch", "samples"]}

    def quantized_quality(
        self, run: LoadedRun, workload: Any, n: int, graphs: dict[str, Graph]
    ) -> dict[str, float]:
        """The character error rate of both graphs on the first ``n`` validation clips."""
        from cadence.models.asr import cer, decode_ids, greedy_decode

        x = workload.inputs(workload.x_val[:n]).cpu()
        refs = [decode_ids([c for c in row if c > 0]) for row in workload.y_val[:n].tolist()]
        out: dict[str, float] = {}
        for label, graph in graphs.items():
            log_probs = torch.cat([torch.from_numpy(graph(x[i : i + 64])) for i in range(0, n, 64)])
            frames = torch.full((n,), log_probs.shape[1], dtype=torch.int64)
            hyps = [decode_ids(ids) for ids in greedy_decode(log_probs, frames)]
            out[f"val_cer_{label}"] = cer(hyps, refs)
        out["val_cer_change"] = out["val_cer_int8"] - out["val_cer_fp32"]
        return out
