"""Spoken digit strings ("four one seven"), synthesised offline with eSpeak NG, for CTC.

The same voices, split and augmentation as the command set (`cadence.data.speech`): training
voices are augmented (speed 0.9-1.1x, gain, a random position, white/pink/brown noise at
5-30 dB), the held-out speaker variants are clean-ish (20-30 dB) and centred, so ``val_cer``
measures transcription of speakers never heard. Each utterance is two to five digits spoken as
one phrase, so the recogniser hears coarticulation between words, not spliced words.

Every clip is padded to the same two seconds with the background noise running through, so a
batch needs no lengths and the model learns that noise before and after speech is blank. A
phrase that would not fit is spoken again faster. Transcripts are strings of digits ("417").
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cadence.data.speech import (
    DIGITS,
    SAMPLE_RATE,
    add_noise,
    colored_noise,
    resample,
    resample_ratio,
    source_key,
    split_voices,
    synthesise_into_cache,
    to_float,
    to_int16,
    trim,
)

__all__ = [
    "MAX_DIGITS",
    "SECONDS",
    "DigitStrings",
    "generate_digit_strings",
    "load_digit_strings",
    "pad_to_clip",
]

SECONDS = 2.0
SAMPLES = int(SECONDS * SAMPLE_RATE)
MIN_DIGITS, MAX_DIGITS = 2, 5
TRAIN_PER_VOICE, VAL_PER_VOICE = 16, 8  # 2,560 training and 320 validation phrases at 160 voices
VERSION = 1  # of the generation recipe: part of the cache key


@dataclass
class DigitStrings:
    """int16 clips (N, SAMPLES) at 16 kHz and their transcripts (strings of digits)."""

    x_train: np.ndarray
    text_train: list[str]
    x_val: np.ndarray
    text_val: list[str]
    source: str


def _place(x: np.ndarray, at: int) -> np.ndarray:
    out = np.zeros(SAMPLES, dtype=np.float32)
    out[at : at + x.size] = x
    return out


def pad_to_clip(x: np.ndarray) -> np.ndarray:
    """A served recording, centred in zeros up to the training clips' two seconds; a longer one
    is kept whole (the encoder takes any length)."""
    if x.size >= SAMPLES:
        return x.astype(np.float32, copy=False)
    return _place(x.astype(np.float32, copy=False), (SAMPLES - x.size) // 2)


def _phrase(synth, voice: str, rng: np.random.Generator, train: bool) -> tuple[np.ndarray, str]:
    n = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
    digits = [int(d) for d in rng.integers(0, 10, n)]
    words = " ".join(DIGITS[d] for d in digits)
    rate, pitch = int(rng.integers(140, 211)), int(rng.integers(25, 76))
    color = ("white", "pink", "brown")[int(rng.integers(3))]
    noise_seed = int(rng.integers(2**31))
    x = trim(
        resample(to_float(synth.say(words, voice, rate, pitch, noise_seed)), synth.sample_rate)
    )
    speed = float(rng.uniform(0.9, 1.1)) if train else 1.0
    # Fit the two seconds (with 0.1 s to spare) by speaking faster rather than cutting a digit.
    speed = max(speed, x.size / (SAMPLES - SAMPLE_RATE // 10))
    if speed != 1.0:
        x = resample_ratio(x, speed)
    peak = np.abs(x).max() + 1e-12
    if train:
        x = _place(
            x * float(rng.uniform(0.3, 1.0)) / peak, int(rng.integers(0, SAMPLES - x.size + 1))
        )
        snr = float(rng.uniform(5, 30))
    else:
        x = _place(x * 0.7 / peak, (SAMPLES - x.size) // 2)
        snr = float(rng.uniform(20, 30))
    text = "".join(str(d) for d in digits)
    return add_noise(x, colored_noise(rng, SAMPLES, color), snr), text


def generate_digit_strings(
    seed: int, n_train_voices: int | None = None, progress: bool = False
) -> DigitStrings:
    """TRAIN_PER_VOICE phrases per training voice, VAL_PER_VOICE per held-out voice."""
    from cadence.data.espeak import synth
    from cadence.data.speech import pick_voices

    s = synth()
    train_voices, val_voices = split_voices()
    train_voices = pick_voices(train_voices, n_train_voices)
    plan = (("train", train_voices, TRAIN_PER_VOICE), ("val", val_voices, VAL_PER_VOICE))
    total = len(train_voices) * TRAIN_PER_VOICE + len(val_voices) * VAL_PER_VOICE
    done = 0
    out: dict[str, tuple[np.ndarray, list[str]]] = {}
    for split, vs, per_voice in plan:
        train = split == "train"
        rng = np.random.default_rng([seed, 0 if train else 1, VERSION, 7])
        xs, texts = [], []
        for voice in vs:
            for _ in range(per_voice):
                x, text = _phrase(s, voice, rng, train)
                xs.append(to_int16(x))
                texts.append(text)
            done += per_voice
            if progress:
                print(
                    f"\rcadence: synthesising digit strings {done}/{total}", end="", file=sys.stderr
                )
        out[split] = (np.stack(xs), texts)
    if progress:
        print(file=sys.stderr)
    (xt, tt), (xv, tv) = out["train"], out["val"]
    return DigitStrings(xt, tt, xv, tv, "synthetic digit strings (eSpeak NG)")


def _generate_into(out: Path, seed: int, n_train_voices: int | None, progress: bool) -> None:
    data = generate_digit_strings(seed, n_train_voices, progress=progress)
    np.save(out / "x_train.npy", data.x_train)
    np.save(out / "x_val.npy", data.x_val)
    (out / "text.json").write_text(json.dumps({"train": data.text_train, "val": data.text_val}))


def load_digit_strings(seed: int, n_train_voices: int | None = None) -> DigitStrings:
    """The set for ``seed``, generated into the cache on first use, in a fresh process (see
    `cadence.data.speech.load_synthetic_speech` for why eSpeak NG needs one)."""
    key = source_key(
        {"kind": "digit-strings", "version": VERSION, "seed": seed, "voices": n_train_voices}
        | {"seconds": SECONDS, "digits": [MIN_DIGITS, MAX_DIGITS]}
        | {"per_voice": [TRAIN_PER_VOICE, VAL_PER_VOICE]}
    )
    folder = synthesise_into_cache("asr", key, _generate_into, (seed, n_train_voices))
    texts = json.loads((folder / "text.json").read_text())
    return DigitStrings(
        np.load(folder / "x_train.npy"),
        texts["train"],
        np.load(folder / "x_val.npy"),
        texts["val"],
        f"synthetic digit strings (eSpeak NG), {folder}",
    )
