"""The user's own recordings: a folder in the Speech Commands layout.

``DIR/<label>/*.wav``, one folder per label (folders starting with ``_background`` hold noise,
not a label, as in the original set). Files are read with ``soundfile`` (libsndfile: PCM of any
width, float, and the other formats it knows), mixed down to mono, resampled to 16 kHz and cut
or padded to one second around their centre.

The validation split follows the data set's own rule, so the same speaker never lands on both
sides: ``DIR/validation_list.txt`` when the folder has one; otherwise the speaker id (the file
name's part before ``_nohash_``, or the whole stem) is hashed with SHA-1 and the files of a
speaker whose hash falls below ``val_fraction`` are held out.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cadence.data.errors import DataError
from cadence.data.speech import CLIP, SAMPLE_RATE, SpeechData, fit_clip, resample, to_int16

__all__ = ["is_speech_folder", "load_speech_folder", "read_wav"]

MAX_SECONDS = 60.0  # a longer "clip" is almost surely a wrong file (a whole recording session)


def read_wav(
    path: Path | str | BinaryIO, *, max_seconds: float = MAX_SECONDS, name: str | None = None
) -> np.ndarray:
    """Mono float32 samples at 16 kHz; a file that cannot be used raises DataError naming it.

    `path` may also be an open binary file (an HTTP upload); `name` is what errors call it.
    """
    import soundfile as sf

    if isinstance(path, (str, Path)):
        path = Path(path)
        source: str | BinaryIO = str(path)
    else:
        source = path
    label = name or str(path)
    try:
        with sf.SoundFile(source) as f:
            if f.frames / max(f.samplerate, 1) > max_seconds:
                raise DataError(
                    f"{label}: {f.frames / f.samplerate:.0f} s of audio; clips must be at most "
                    f"{max_seconds:.0f} s"
                )
            rate = f.samplerate
            x = f.read(dtype="float32", always_2d=True)
    except DataError:
        raise
    except (RuntimeError, sf.LibsndfileError, OSError, TypeError) as exc:
        raise DataError(f"{label}: not a readable audio file ({exc})") from None
    if x.shape[0] == 0:
        raise DataError(f"{label}: no audio samples")
    return resample(x.mean(axis=1), int(rate), SAMPLE_RATE)


def _labels(root: Path) -> list[str]:
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_background", "."))
    )


def is_speech_folder(path: str | Path) -> bool:
    """A folder of label folders holding .wav files."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return False
    return any(any((root / label).glob("*.wav")) for label in _labels(root))


def _speaker(stem: str) -> str:
    return stem.split("_nohash_")[0]


def _held_out(root: Path, val_fraction: float) -> set[str]:
    listed = root / "validation_list.txt"
    if listed.is_file():
        return {line.strip() for line in listed.read_text().splitlines() if line.strip()}
    held = set()
    for label in _labels(root):
        for f in (root / label).glob("*.wav"):
            digest = int(hashlib.sha1(_speaker(f.stem).encode()).hexdigest(), 16)
            if (digest % 100_000) / 100_000 < val_fraction:
                held.add(f"{label}/{f.name}")
    return held


def load_speech_folder(path: str | Path, val_fraction: float) -> SpeechData:
    """Every .wav of every label folder, as one-second int16 clips, split by speaker."""
    root = Path(path).expanduser()  # data.path=~/... as the config check reads it
    labels = _labels(root)
    if not labels:
        raise DataError(f"data.path: {root} has no label folders of .wav files (DIR/<label>/*.wav)")
    held = _held_out(root, val_fraction)
    parts: dict[bool, tuple[list[np.ndarray], list[int]]] = {True: ([], []), False: ([], [])}
    for i, label in enumerate(labels):
        for f in sorted((root / label).glob("*.wav")):
            xs, ys = parts[f"{label}/{f.name}" in held]
            xs.append(to_int16(fit_clip(read_wav(f))))
            ys.append(i)
    (xv, yv), (xt, yt) = parts[True], parts[False]
    if not xt or not xv:
        which = "training" if not xt else "validation"
        raise DataError(
            f"data.path: {root} leaves no {which} clips (val split by speaker: "
            f"{len(xv)} of {len(xv) + len(xt)} files); add speakers or set data.val_fraction"
        )

    def stack(xs: list[np.ndarray]) -> np.ndarray:
        return np.stack(xs) if xs else np.zeros((0, CLIP), dtype=np.int16)

    return SpeechData(
        stack(xt),
        np.asarray(yt, dtype=np.int64),
        stack(xv),
        np.asarray(yv, dtype=np.int64),
        tuple(labels),
        str(root),
    )
