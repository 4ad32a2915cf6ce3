"""Audio requests: a WAV (or any format libsndfile reads) uploaded as multipart field ``file``.

The upload goes through the same reader as training data (`cadence.data.audio_files.read_wav`:
mono, resampled to 16 kHz) and, for the command classifier, the same one-second centring
(`fit_clip`), so a served clip is what a validation clip was. A JSON body of raw samples still
works on ``/v1/predict``; an upload is what a real client (``curl -F file=@yes.wav``) sends.
"""

from __future__ import annotations

import io

import numpy as np
from fastapi import Request

__all__ = ["AudioError", "is_upload", "read_upload"]

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # 60 s of 16-bit stereo 44.1 kHz is about 10 MB


class AudioError(Exception):
    """A bad upload; ``status`` is the HTTP code and the message names the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def is_upload(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def read_upload(request: Request) -> np.ndarray:
    """The uploaded file's samples (float32, mono, 16 kHz), or AudioError naming what is wrong."""
    from starlette.datastructures import UploadFile

    from cadence.data import DataError
    from cadence.data.audio_files import read_wav

    size = int(request.headers.get("content-length") or 0)
    if size > MAX_UPLOAD_BYTES:
        raise AudioError(413, f"file: {size} bytes, the limit is {MAX_UPLOAD_BYTES}")
    try:
        form = await request.form()
    except Exception as exc:  # starlette raises its own parse errors for a malformed body
        raise AudioError(422, f"body: not valid multipart/form-data ({exc})") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise AudioError(422, "file: missing; send the audio as multipart field `file`")
    data = await upload.read()
    if len(data) > MAX_UPLOAD_BYTES:
        raise AudioError(413, f"file: {len(data)} bytes, the limit is {MAX_UPLOAD_BYTES}")
    try:
        return read_wav(io.BytesIO(data), name=f"file {upload.filename or ''}".strip())
    except DataError as exc:
        raise AudioError(422, str(exc)) from None
