"""``workload: speech``: spoken-command recognition on synthetic voices or the user's recordings.

Clips stay int16 on the device (half the memory of float32: 3,520 one-second training clips are
113 MB instead of 225 MB) and are widened per micro-batch; the model takes raw audio and computes
its own log-mel features (``cadence.models.audio``), so what is exported and served is the whole
pipeline from samples to labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cadence.data import DataError
from cadence.data.audio_files import is_speech_folder, load_speech_folder
from cadence.data.speech import LABELS, SpeechData, load_synthetic_speech
from cadence.models.audio import SpeechCNN
from cadence.workloads.tensors import ClassificationWorkload

if TYPE_CHECKING:
    from cadence.config import Config

__all__ = ["SpeechWorkload", "build_speech", "speech_data", "speech_model"]


class SpeechWorkload(ClassificationWorkload):
    """Audio clips (int16 on the device) and labels; the loss and accuracy of classification."""

    def inputs(self, x: Tensor) -> Tensor:
        """int16 -> float32 in [-1, 1), the scale `read_wav` gives a served upload."""
        return x.float() / 32768.0


def speech_model(cfg: Config, n_classes: int | None = None) -> SpeechCNN:
    """The model from the config alone; `n_classes` is the data set's (22 for the synthetic)."""
    m = cfg.model
    return SpeechCNN(
        n_classes or len(LABELS),
        channels=tuple(m.channels or (32, 64, 128)),
        dropout=m.dropout,
        augment=m.augment,
    )


def speech_data(cfg: Config, val_fraction: float) -> SpeechData:
    """The clips a config trains on: ``data.path`` (a Speech Commands folder) or synthetic.

    `val_fraction` is the share of a folder's speakers held out when it has no
    validation_list.txt (the registry's default unless ``data.val_fraction`` is set)."""
    path = cfg.data.path
    if path is None:
        return load_synthetic_speech(cfg.train.seed, cfg.data.voices)
    if not is_speech_folder(path):
        raise DataError(
            f"data.path: {path} is not a folder of label folders holding .wav files "
            "(the Speech Commands layout: DIR/<label>/*.wav)"
        )
    return load_speech_folder(path, val_fraction)


def build_speech(cfg: Config, device: torch.device, val_fraction: float) -> SpeechWorkload:
    data = speech_data(cfg, val_fraction)
    model = speech_model(cfg, n_classes=len(data.labels))
    w = SpeechWorkload(
        model.to(device),
        torch.from_numpy(data.x_train).to(device),
        torch.from_numpy(data.y_train).to(device),
        torch.from_numpy(data.x_val).to(device),
        torch.from_numpy(data.y_val).to(device),
        eval_samples=cfg.train.eval_samples,
    )
    w.extras["labels"] = list(data.labels)
    return w
