"""One quiet ONNX export for the tests that check exported graphs in onnxruntime."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch


def onnx_export(model: torch.nn.Module, example: torch.Tensor, path: Any, **kwargs: Any) -> None:
    """torch.onnx.export(dynamo=True), without its warnings about absent torchvision ops."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=True, verbose=False, **kwargs)
        finally:
            logging.disable(logging.NOTSET)
