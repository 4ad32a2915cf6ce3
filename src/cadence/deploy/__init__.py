"""Ship what was trained: export (safetensors, ONNX), text generation, HTTP serving.

``load_run`` rebuilds a model from a run directory; ``export_run``, ``generate`` and
``create_app`` build on it. The server's dependencies (FastAPI, uvicorn) and the ONNX ones are
imported only when used, so training never needs them.
"""

from __future__ import annotations

from typing import Any

from cadence.deploy.rundir import LoadedRun, load_run
from cadence.models.generate import SamplingParams, StreamDecoder, generate, generate_batch

__all__ = [
    "LoadedRun",
    "SamplingParams",
    "StreamDecoder",
    "create_app",
    "export_run",
    "generate",
    "generate_batch",
    "load_run",
]


def __getattr__(name: str) -> Any:
    if name == "export_run":
        from cadence.deploy.export import export_run

        return export_run
    if name == "create_app":
        from cadence.deploy.serve import create_app

        return create_app
    raise AttributeError(f"module 'cadence.deploy' has no attribute {name!r}")
