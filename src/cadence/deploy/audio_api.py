"""Audio requests: a WAV (or any format libsndfile reads) uploaded as multipart field ``file``.

The upload goes through the same reader as training data (`cadence.data.audio_files.read_wav`:
mono, resampled to 16 kHz) and, for the command classifier, the same one-second centring
(`fit_clip`), so a served clip is what a validation clip was. An upload is what a real client
(``curl -F file=@yes.wav``) sends; a client that already holds samples (a browser's microphone,
a telephony gateway) sends them as JSON, ``{"audio": base64 of 16-bit little-endian mono PCM,
"sample_rate": 16000}``, the encoding speech APIs use for raw audio.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

import numpy as np
from fastapi import Request

__all__ = [
    "UPLOAD_CONTENT",
    "AudioError",
    "decode_pcm",
    "is_upload",
    "read_audio",
    "read_upload",
    "wants_pcm",
]

# OpenAPI's request content of an audio upload: the file as multipart field `file`
UPLOAD_CONTENT = {
    "multipart/form-data": {
        "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
    }
}
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


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError):
        return None


async def wants_pcm(request: Request) -> bool:
    """A JSON body with an ``audio`` field (base64 PCM) rather than ``inputs``."""
    body = await _json(request)  # starlette keeps the body, so a later parse still reads it
    return isinstance(body, dict) and "audio" in body


def decode_pcm(body: Any) -> np.ndarray:
    """Samples (float32, 16 kHz) from ``{"audio": base64 PCM16 LE, "sample_rate": Hz}``."""
    from cadence.data.audio_files import MAX_SECONDS
    from cadence.data.speech import SAMPLE_RATE, resample

    if not isinstance(body, dict) or not isinstance(body.get("audio"), str):
        raise AudioError(
            422, "audio: missing; send base64 16-bit PCM as JSON field `audio`, or a WAV file"
        )
    unknown = sorted(set(body) - {"audio", "sample_rate", "channels"})
    if unknown:
        raise AudioError(422, f"{unknown[0]}: unknown field (audio, sample_rate, channels)")
    channels = body.get("channels", 1)
    if channels != 1:
        raise AudioError(
            422, f"channels: {channels!r}; PCM in JSON must be mono (1), or upload a WAV file"
        )
    rate = body.get("sample_rate", SAMPLE_RATE)
    if not isinstance(rate, int) or isinstance(rate, bool) or not 1000 <= rate <= 384_000:
        raise AudioError(422, f"sample_rate: {rate!r}; give the rate in Hz, 1000-384000")
    if len(body["audio"]) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
        raise AudioError(413, f"audio: more than {MAX_UPLOAD_BYTES} bytes of PCM")
    try:
        raw = base64.b64decode(body["audio"], validate=True)
    except (binascii.Error, ValueError):
        raise AudioError(422, "audio: not valid base64") from None
    if not raw:
        raise AudioError(422, "audio: no samples")
    if len(raw) % 2:
        raise AudioError(422, f"audio: {len(raw)} bytes; 16-bit PCM has two bytes per sample")
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if len(x) / rate > MAX_SECONDS:
        raise AudioError(
            422, f"audio: {len(x) / rate:.0f} s; clips must be at most {MAX_SECONDS:.0f} s"
        )
    return resample(x, rate, SAMPLE_RATE)


async def read_audio(request: Request) -> np.ndarray:
    """A WAV upload or base64 PCM in JSON, whichever the request carries."""
    if is_upload(request):
        return await read_upload(request)
    return decode_pcm(await _json(request))
