"""What ``cadence explain --input`` may be for each kind of model, read into the model's input.

A language model takes the prompt's text itself; an image classifier a PNG/JPEG or a ``.npy``
array; the tabular one a ``.npy`` of its features; the keyword classifier a WAV clip. Each is
converted the way the server converts a request (the same shapes, the same one-second clip), so
the explanation is of the prediction a user would get. Anything else is a ``ConfigError``
naming ``--input`` and what would fix it, raised before any file is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cadence.config import ConfigError
from cadence.deploy.kinds.classifier import INPUT_SHAPES
from cadence.deploy.rundir import LoadedRun

__all__ = [
    "IMAGE_SIDES",
    "IMAGE_SUFFIXES",
    "baseline_token",
    "read_array",
    "read_clip",
    "read_prompt",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"})
ARRAY_SUFFIXES = frozenset({".npy"})
FILE_SUFFIXES = IMAGE_SUFFIXES | AUDIO_SUFFIXES | ARRAY_SUFFIXES
# The classifiers whose inputs are square grayscale images, by side (digits stores its 8x8
# flat); the others' inputs are feature vectors.
IMAGE_SIDES = {"mnist": 28, "digits": 8}


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _file_like(text: str) -> str | None:
    """The suffix of an --input that names an image, audio or array file, else None."""
    suffix = Path(text).suffix.lower()
    return suffix if suffix in FILE_SUFFIXES and not any(c.isspace() for c in text) else None


def read_prompt(run: LoadedRun, text: str) -> list[int]:
    """The prompt's token ids; it must be text (not a file name) and fit the model's context."""
    suffix = _file_like(text)
    if suffix is not None:
        raise ConfigError(
            f"--input: {text} names a {suffix} file, but {run.what} is explained on a text "
            "prompt; pass the prompt itself, e.g. --input 'def f(x):'"
        )
    ids = [int(t) for t in run.tokenizer.encode(text)]  # type: ignore[union-attr]
    if not ids:
        raise ConfigError("--input: the prompt is empty; pass some text to explain")
    if len(ids) > run.seq_len:
        raise ConfigError(
            f"--input: the prompt is {len(ids)} tokens, more than the model's context of "
            f"{run.seq_len}; shorten it"
        )
    return ids


def baseline_token(tokenizer: object) -> int:
    """The token that stands for "no text" at every position of the baseline.

    A pretrained tokenizer's own padding token where it has one; otherwise the NUL byte, which
    no text contains (one token in the byte tokenizer and in byte-level BPE), so its embedding
    carries as little of what the model learned about real text as any row of the table does;
    otherwise the end-of-text token, and id 0 as the last resort.
    """
    special = getattr(tokenizer, "special_token", None)
    if special is not None:
        pad = special("pad_token")
        if pad is not None:
            ids = tokenizer.encode(pad)  # type: ignore[attr-defined]
            if len(ids) == 1:
                return int(ids[0])
    nul = tokenizer.encode("\x00")  # type: ignore[attr-defined]
    if len(nul) == 1:
        return int(nul[0])
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if eos is not None else 0


def _existing(run: LoadedRun, text: str, wants: str) -> Path:
    """``--input`` as a file that exists, or one line saying what the model takes instead."""
    path = Path(text)
    if path.is_file():
        return path
    if path.suffix and not any(c.isspace() for c in text):
        raise ConfigError(f"--input: {text}: no such file; {run.what} is explained on {wants}")
    raise ConfigError(f"--input: {_short(text)} is not a file; {run.what} is explained on {wants}")


def read_array(run: LoadedRun, text: str) -> torch.Tensor:
    """One example ``(1, *shape)`` of an image or tabular classifier, from an image or ``.npy``.

    Images are read as grayscale scaled to [0, 1] (the range the MNIST and digits data are
    stored in, ink bright on a black ground); a square image of another size is resized to the
    model's, anything else is refused rather than distorted.
    """
    shape = INPUT_SHAPES[run.config.workload]
    side = IMAGE_SIDES.get(run.config.workload)
    image = side is not None
    wants = (
        f"a {side}x{side} grayscale image (PNG/JPEG) or a .npy of shape {list(shape)}"
        if image
        else f"a .npy of its {int(np.prod(shape))} standardised features"
    )
    path = _existing(run, text, wants)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES and side is not None:
        arr = _read_image(path, side)
    elif suffix in ARRAY_SUFFIXES:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--input: {path}: not a readable .npy file ({exc})") from None
    else:
        raise ConfigError(
            f"--input: {path} is a {suffix or 'suffix-less'} file; {run.what} "
            f"is explained on {wants}"
        )
    if arr.dtype.kind not in "fiub":
        raise ConfigError(f"--input: {path} holds {arr.dtype} values; it must hold numbers")
    size = int(np.prod(shape))
    forms = {shape, (1, *shape), (side, side) if image else shape}  # flat is always taken
    if arr.size != size or (arr.ndim > 1 and arr.shape not in forms):
        raise ConfigError(f"--input: {path} has shape {list(arr.shape)}; {run.what} takes {wants}")
    if not np.isfinite(arr).all():
        raise ConfigError(f"--input: {path} holds NaN or infinite values")
    return torch.from_numpy(arr.astype(np.float64).reshape(1, *shape)).to(run.dtype)


def _read_image(path: Path, side: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            gray = img.convert("L")
    except (OSError, UnidentifiedImageError) as exc:
        raise ConfigError(f"--input: {path}: not a readable image ({exc})") from None
    width, height = gray.size
    if width != height:
        raise ConfigError(
            f"--input: {path} is {width}x{height} pixels; the model takes {side}x{side} "
            "grayscale images (square ones are resized): crop it square"
        )
    if width != side:
        gray = gray.resize((side, side), Image.Resampling.LANCZOS)
    return np.asarray(gray, dtype=np.float64) / 255.0


def read_clip(run: LoadedRun, text: str) -> torch.Tensor:
    """One second of 16 kHz audio ``(1, 16000)``, cut or padded as the server does."""
    from cadence.data import DataError
    from cadence.data.audio_files import read_wav
    from cadence.data.speech import fit_clip

    path = _existing(run, text, "a WAV clip of a spoken word (16 kHz or resampled to it)")
    if path.suffix.lower() in IMAGE_SUFFIXES | ARRAY_SUFFIXES:
        raise ConfigError(
            f"--input: {path} is a {path.suffix} file; {run.what} is explained on a WAV clip"
        )
    try:
        audio = read_wav(path)
    except DataError as exc:
        raise ConfigError(f"--input: {exc}") from None
    return torch.from_numpy(fit_clip(audio))[None]
