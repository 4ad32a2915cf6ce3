"""Spoken commands and digits, synthesised offline with eSpeak NG, split by voice, cached.

The vocabulary is the Speech Commands set's: ten commands, ten digits, an ``_unknown_`` class
(other words of that set, as its benchmark uses them) and ``_silence_`` (background noise alone),
so a model trained here answers the question a keyword spotter is asked. Each clip is one second
at 16 kHz.

Voices are an accent (eSpeak's English variants) combined with a speaker variant (eSpeak's voice
modifiers: pitch, formants, breathiness). The split holds out whole speaker variants:
validation voices are never heard in training, in any accent, so ``val_accuracy`` measures
generalisation to new speakers. The split is fixed (seed-free) so runs with different seeds are
scored on the same voices; the seed draws each clip's speaking rate, pitch and augmentation.

Training clips are augmented the way a real pipeline does: speed perturbation (0.9-1.1x),
gain, a random time shift inside the second, and background noise (white, pink or brown) at an
SNR drawn from 5-30 dB. Validation clips are centred with light noise (20-30 dB).

Generation takes seconds and happens once per (seed, voices) into the cadence cache
(``$CADENCE_CACHE/speech/<key>``), written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from cadence.data.errors import DataError

__all__ = [
    "ACCENTS",
    "LABELS",
    "SAMPLE_RATE",
    "SpeechData",
    "load_synthetic_speech",
    "split_voices",
    "voices",
]

SAMPLE_RATE = 16_000
CLIP = SAMPLE_RATE  # samples per clip: one second
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow")
UNKNOWN, SILENCE = "_unknown_", "_silence_"
LABELS = (*COMMANDS, *DIGITS, UNKNOWN, SILENCE)

ACCENTS = (
    "en",
    "en-us",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
# eSpeak NG's speaker variants that stay intelligible (the novelty robots and whispers are left
# out); every fifth is a validation speaker.
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak", "klatt",
    "klatt2", "klatt3", "Andy", "Annie", "Alex", "michel", "john", "david", "edward", "max",
    "linda",
)  # fmt: skip
VERSION = 1  # of the generation recipe: part of the cache key


def voices(accents: tuple[str, ...] = ACCENTS, variants: tuple[str, ...] = VARIANTS) -> list[str]:
    return [f"{a}+{v}" for v in variants for a in accents]


def split_voices() -> tuple[list[str], list[str]]:
    """(training voices, validation voices): speaker variants are held out whole."""
    val_variants = VARIANTS[4::5]
    train_variants = tuple(v for v in VARIANTS if v not in val_variants)
    return voices(variants=train_variants), voices(variants=val_variants)


@dataclass
class SpeechData:
    """Clips as int16 (N, 16000) arrays with label indices, and where they came from."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    labels: tuple[str, ...]
    source: str


# ---------------------------------------------------------------- signal helpers


def to_float(samples: np.ndarray) -> np.ndarray:
    return samples.astype(np.float32) / 32768.0


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


def resample(x: np.ndarray, src_rate: int, dst_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (scipy's FIR anti-aliasing filter) by the reduced rate ratio."""
    if src_rate == dst_rate:
        return x.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = np.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    taps = _anti_alias_taps(up, down).astype(x.dtype if x.dtype.kind == "f" else np.float64)
    return resample_poly(x, up, down, axis=-1, window=taps).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _anti_alias_taps(up: int, down: int) -> np.ndarray:
    """The low-pass filter `resample_poly` designs for (up, down) with its default Kaiser
    window, designed once: the design (`firwin`) took a fifth of generating the speech set, as
    every clip of a voice is resampled by the same ratio. Given the same taps, `resample_poly`
    computes the same samples (a test holds it)."""
    from scipy.signal import firwin

    half_len = 10 * max(up, down)
    return firwin(2 * half_len + 1, 1.0 / max(up, down), window=("kaiser", 5.0))


def trim(x: np.ndarray, threshold: float = 0.02, margin: int = 160) -> np.ndarray:
    """The span where |x| exceeds ``threshold`` of its peak, with ``margin`` samples around."""
    if x.size == 0:
        return x
    loud = np.flatnonzero(np.abs(x) > threshold * (np.abs(x).max() + 1e-12))
    if loud.size == 0:
        return x[:0]
    return x[max(loud[0] - margin, 0) : loud[-1] + margin + 1]


def fit_clip(x: np.ndarray, offset: int | None = None) -> np.ndarray:
    """``x`` inside one second: centred (offset None) or at ``offset``; longer ones are cut
    around their centre."""
    if x.size > CLIP:
        start = (x.size - CLIP) // 2
        return x[start : start + CLIP].astype(np.float32)
    out = np.zeros(CLIP, dtype=np.float32)
    at = (CLIP - x.size) // 2 if offset is None else int(np.clip(offset, 0, CLIP - x.size))
    out[at : at + x.size] = x
    return out


def colored_noise(rng: np.random.Generator, n: int, color: str) -> np.ndarray:
    """Unit-RMS noise whose power falls as 1/f^k: white k=0, pink k=1, brown k=2."""
    k = {"white": 0.0, "pink": 1.0, "brown": 2.0}[color]
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spectrum.size, dtype=np.float64)
    f[0] = 1.0
    noise = np.fft.irfft(spectrum / f ** (k / 2), n)
    return (noise / (np.sqrt(np.mean(noise**2)) + 1e-12)).astype(np.float32)


def add_noise(x: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``x`` plus ``noise`` scaled to the given signal-to-noise ratio (by RMS over the clip)."""
    signal = np.sqrt(np.mean(x**2))
    if signal == 0:
        return x + noise * 0.05
    scale = signal / (10 ** (snr_db / 20) * (np.sqrt(np.mean(noise**2)) + 1e-12))
    return x + noise * scale


# ---------------------------------------------------------------- generation


def _word(label: str, rng: np.random.Generator) -> str | None:
    if label == SILENCE:
        return None
    if label == UNKNOWN:
        return UNKNOWN_WORDS[int(rng.integers(len(UNKNOWN_WORDS)))]
    return label


def _clip(synth, label: str, voice: str, rng: np.random.Generator, train: bool) -> np.ndarray:
    """One clip of ``label`` by ``voice``, drawn from ``rng``."""
    rate, pitch = int(rng.integers(130, 211)), int(rng.integers(25, 76))
    color = ("white", "pink", "brown")[int(rng.integers(3))]
    word = _word(label, rng)
    if word is None:  # _silence_: background noise alone, at a random level
        return colored_noise(rng, CLIP, color) * float(rng.uniform(0.001, 0.05))
    noise_seed = int(rng.integers(2**31))
    x = synth.say(word, voice, rate, pitch, noise_seed)
    x = trim(resample(to_float(x), synth.sample_rate))
    if train:
        speed = float(rng.uniform(0.9, 1.1))
        x = resample_ratio(x, speed)
        x = x * float(rng.uniform(0.3, 1.0)) / (np.abs(x).max() + 1e-12)
        x = fit_clip(x, int(rng.integers(0, max(CLIP - x.size, 0) + 1)))
        snr = float(rng.uniform(5, 30))
    else:
        x = fit_clip(x * 0.7 / (np.abs(x).max() + 1e-12))
        snr = float(rng.uniform(20, 30))
    return add_noise(x, colored_noise(rng, CLIP, color), snr)


def resample_ratio(x: np.ndarray, speed: float) -> np.ndarray:
    """Speed perturbation: play ``speed`` times faster (pitch and tempo together, as Kaldi's
    speed perturbation does), by resampling to ``len / speed`` samples."""
    from scipy.signal import resample

    n = max(int(round(x.size / speed)), 1)
    return resample(x, n).astype(np.float32) if x.size else x


def pick_voices(train_voices: list[str], n: int | None) -> list[str]:
    """``n`` of the training voices (all for None), spread over accents and speakers alike:
    every k-th of the interleaved list."""
    if n is None:
        return train_voices
    step = max(len(train_voices) // max(n, 1), 1)
    return train_voices[::step][:n]


def generate(seed: int, n_train_voices: int | None = None, progress: bool = False) -> SpeechData:
    """Every (voice, label) once: training voices augmented, validation voices held out."""
    from cadence.data.espeak import synth

    s = synth()
    train_voices, val_voices = split_voices()
    train_voices = pick_voices(train_voices, n_train_voices)
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    plan = (("train", train_voices, True), ("val", val_voices, False))
    total = (len(train_voices) + len(val_voices)) * len(LABELS)
    done = 0
    for split, vs, train in plan:
        rng = np.random.default_rng([seed, 0 if train else 1, VERSION])
        xs, ys = [], []
        for voice in vs:
            for i, label in enumerate(LABELS):
                xs.append(to_int16(_clip(s, label, voice, rng, train)))
                ys.append(i)
            done += len(LABELS)
            if progress:
                print(f"\rcadence: synthesising speech {done}/{total}", end="", file=sys.stderr)
        parts[split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    if progress:
        print(file=sys.stderr)
    (xt, yt), (xv, yv) = parts["train"], parts["val"]
    return SpeechData(xt, yt, xv, yv, LABELS, "synthetic (eSpeak NG)")


def source_key(what: dict) -> str:
    """A cache key for synthetic audio: the recipe's settings plus what shapes every sample
    (the eSpeak NG build, the voices, the sample rate)."""
    try:
        espeak = metadata.version("espeakng-loader")
    except metadata.PackageNotFoundError:  # pragma: no cover
        espeak = "unknown"
    what = what | {"espeak": espeak, "accents": ACCENTS, "variants": VARIANTS, "rate": SAMPLE_RATE}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def _key(seed: int, n_train_voices: int | None) -> str:
    return source_key(
        {"version": VERSION, "seed": seed, "voices": n_train_voices, "labels": LABELS}
    )


def _generate_into(out: Path, seed: int, n_train_voices: int | None, progress: bool) -> None:
    data = generate(seed, n_train_voices, progress=progress)
    for name in ("x_train", "y_train", "x_val", "y_val"):
        np.save(out / f"{name}.npy", getattr(data, name))
    (out / "meta.json").write_text(json.dumps({"labels": list(data.labels)}))


def synthesise_into_cache(kind: str, key: str, target, args: tuple) -> Path:
    """The cache folder ``kind/key``, filled on first use by ``target(out, *args, progress)``
    in a process where eSpeak NG never ran (see `load_synthetic_speech` for why).

    That process is forked from multiprocessing's fork server, which imports this module (and
    so torch and cadence) once and never synthesises anything itself: each generation starts
    with eSpeak's state exactly as a fresh interpreter has it, without paying the imports again.
    """
    import multiprocessing

    from cadence.data.cache import cache_folder

    def make(out: Path) -> None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        proc = ctx.Process(target=target, args=(out, *args, sys.stderr.isatty()))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise DataError(f"workload: {kind} synthesis failed (exit status {proc.exitcode})")

    return cache_folder(kind, key, make, f"synthesising {kind}")


def load_synthetic_speech(seed: int, n_train_voices: int | None = None) -> SpeechData:
    """The synthetic set for ``seed``, generated into the cache on first use.

    Generation runs in a fresh process: eSpeak NG's wave generator keeps state between
    utterances that no call resets (its pitch "flutter" runs on across calls; measured here:
    the same word twice in one process differs from the 64th sample on, while the same sequence
    of calls in a new process is identical), so only a fresh process makes the set a function of
    (seed, voices) alone.
    """
    folder = synthesise_into_cache(
        "speech", _key(seed, n_train_voices), _generate_into, (seed, n_train_voices)
    )
    arrays = {n: np.load(folder / f"{n}.npy") for n in ("x_train", "y_train", "x_val", "y_val")}
    labels = tuple(json.loads((folder / "meta.json").read_text())["labels"])
    return SpeechData(**arrays, labels=labels, source=f"synthetic (eSpeak NG), {folder}")
