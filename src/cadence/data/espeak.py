"""Speech synthesis with eSpeak NG, offline: the ``espeakng-loader`` wheel's library and voices.

No recorded speech data set installs offline, but a synthesiser does: the wheel ships
``libespeak-ng`` and its voice data. It is called through ``ctypes`` (eSpeak has no maintained
Python binding that works from a wheel alone) in synchronous mode, where ``espeak_Synth`` returns
after the callback has received every sample. Synthesis is fast (about a millisecond a word), so
one process does it all. eSpeak keeps global state, so there is one :class:`Synth` per process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

import numpy as np

from cadence.data.errors import DataError

__all__ = ["Synth", "synth"]

_OUTPUT_SYNCHRONOUS = 2
_RATE, _PITCH, _RANGE = 1, 3, 4  # espeak_PARAMETER values
_POS_CHARACTER = 1
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class Synth:
    """One initialised eSpeak NG: ``say(text, voice, rate, pitch)`` -> int16 samples."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError:  # pragma: no cover - a dependency of the package
            raise DataError(
                "workload: speech needs the espeakng-loader package (pip install espeakng-loader)"
            ) from None
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.restype = ctypes.c_int
        data = espeakng_loader.get_data_path().encode()
        self.sample_rate = self._lib.espeak_Initialize(_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if self.sample_rate <= 0:
            raise DataError("workload: eSpeak NG did not initialise (espeakng-loader's data)")
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._receive)  # kept alive as long as the library holds it
        self._lib.espeak_SetSynthCallback(self._callback)
        self._voice: str | None = None
        # Noise (breathy and rough variants) comes from eSpeak's own generator, seeded from the
        # clock at start-up (the same word differed between processes until it was seeded), and
        # from the C library's rand(), which other libraries in the process also advance: both
        # are seeded before every utterance.
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"))
        self._seed_espeak = getattr(self._lib, "espeak_ng_SetRandSeed", None)

    def _receive(self, wav: Any, n: int, events: Any) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = go on

    def say(
        self, text: str, voice: str, rate: int = 175, pitch: int = 50, seed: int = 0
    ) -> np.ndarray:
        """``text`` spoken by ``voice`` (e.g. ``en-us+f3``) at ``rate`` words per minute and
        ``pitch`` (0-100): int16 samples at :attr:`sample_rate`; ``seed`` seeds its noise."""
        if voice != self._voice:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise DataError(f"speech: eSpeak NG has no voice {voice!r}")
            self._voice = voice
        self._lib.espeak_SetParameter(_RATE, int(rate), 0)
        self._lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        self._chunks = []
        self._libc.srand(ctypes.c_uint(seed & 0xFFFFFFFF))
        if self._seed_espeak is not None:
            self._seed_espeak(ctypes.c_long(seed))
        raw = text.encode()
        buf = ctypes.create_string_buffer(raw)
        if self._lib.espeak_Synth(buf, len(raw) + 1, 0, _POS_CHARACTER, 0, 0, None, None) != 0:
            raise DataError(f"speech: eSpeak NG could not speak {text!r} with {voice!r}")
        self._lib.espeak_Synchronize()
        if not self._chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(self._chunks).astype(np.int16, copy=False)


_SYNTH: Synth | None = None


def synth() -> Synth:
    """This process's synthesiser (eSpeak is initialised once)."""
    global _SYNTH
    if _SYNTH is None:
        _SYNTH = Synth()
    return _SYNTH
