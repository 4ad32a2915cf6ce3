"""Synthetic speech (eSpeak NG) and the user's recordings: determinism, voice split, balance,
the signal helpers against closed forms, the cache, and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from cadence.data import DataError
from cadence.data import speech as sp
from cadence.data.audio_files import is_speech_folder, load_speech_folder, read_wav
from cadence.data.cache import cache_folder
from cadence.data.espeak import synth


def test_espeak_speaks_and_refuses_an_unknown_voice() -> None:
    s = synth()
    x = s.say("seven", "en-us+f3")
    assert s.sample_rate == 22050 and x.dtype == np.int16
    assert 0.1 * s.sample_rate < x.size < 2 * s.sample_rate and np.abs(x).max() > 1000
    assert not np.array_equal(x, s.say("seven", "en-us+m3"))  # another speaker sounds otherwise
    with pytest.raises(DataError, match="no voice 'nope'"):
        s.say("seven", "nope")


def test_every_voice_in_the_tables_exists() -> None:
    train, val = sp.split_voices()
    for voice in train + val:
        assert synth().say("go", voice).size > 0, voice


def test_validation_speakers_are_never_heard_in_training() -> None:
    train, val = sp.split_voices()
    assert not set(train) & set(val)
    speakers = {v.split("+")[1] for v in train}, {v.split("+")[1] for v in val}
    assert not speakers[0] & speakers[1]  # held out whole, in every accent
    accents = {v.split("+")[0] for v in val}
    assert accents == set(sp.ACCENTS)
    assert len(train) == 160 and len(val) == 40


def _fresh(seed: int, voices: int, cache, monkeypatch) -> sp.SpeechData:
    monkeypatch.setenv("CADENCE_CACHE", str(cache))
    return sp.load_synthetic_speech(seed, voices)


def test_generation_is_deterministic_per_seed_and_balanced(tmp_path, monkeypatch) -> None:
    """Each set is generated in its own fresh cache (a new process each time)."""
    a, b, c = (_fresh(s, 3, tmp_path / str(i), monkeypatch) for i, s in enumerate((0, 0, 1)))
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.x_val, b.x_val)
    assert not np.array_equal(a.x_train, c.x_train)
    n = len(sp.LABELS)
    assert a.x_train.shape == (3 * n, sp.CLIP) and a.x_val.shape == (40 * n, sp.CLIP)
    assert np.all(np.bincount(a.y_train, minlength=n) == 3)
    assert np.all(np.bincount(a.y_val, minlength=n) == 40)
    silence = sp.LABELS.index(sp.SILENCE)
    loud = np.abs(a.x_train.astype(np.float32)).max(axis=1)
    assert np.all(loud[a.y_train != silence] > 3000)  # words are loud, not empty clips


def test_resampling_keeps_a_tone_and_the_duration() -> None:
    t = np.arange(22050) / 22050
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    y = sp.resample(tone, 22050, 16000)
    assert y.size == 16000
    assert np.argmax(np.abs(np.fft.rfft(y))) == 1000  # 1 Hz bins over one second


def test_resampling_with_the_designed_taps_equals_scipys_own_design() -> None:
    """`resample` designs its filter once per ratio; the samples are scipy's default's."""
    from scipy.signal import resample_poly

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64, np.int16):
        x = (rng.standard_normal(5000) * 1000).astype(dtype)
        want = resample_poly(x, 320, 441).astype(np.float32)
        assert np.array_equal(sp.resample(x, 22050, 16000), want), dtype


def test_noise_is_added_at_the_asked_snr_and_with_its_colour() -> None:
    rng = np.random.default_rng(0)
    x = np.sin(np.linspace(0, 200, sp.CLIP)).astype(np.float32) * 0.3
    for color, slope in (("white", 0.0), ("pink", -1.0), ("brown", -2.0)):
        noise = sp.colored_noise(rng, sp.CLIP, color)
        y = sp.add_noise(x, noise, 12.0)
        snr = 10 * np.log10(np.mean(x**2) / np.mean((y - x) ** 2))
        assert snr == pytest.approx(12.0, abs=1e-3)
        power = np.abs(np.fft.rfft(noise))[10:5000] ** 2
        f = np.arange(10, 5000)
        fitted = np.polyfit(np.log(f), np.log(power), 1)[0]
        assert fitted == pytest.approx(slope, abs=0.15), color


def test_fit_clip_centres_shifts_and_cuts() -> None:
    x = np.ones(100, dtype=np.float32)
    assert np.flatnonzero(sp.fit_clip(x))[0] == (sp.CLIP - 100) // 2
    assert np.flatnonzero(sp.fit_clip(x, 7))[0] == 7
    assert sp.fit_clip(np.arange(sp.CLIP + 10, dtype=np.float32))[0] == 5


def test_the_cache_keeps_a_finished_folder_and_no_half_made_one() -> None:
    calls = []

    def make(out):
        calls.append(out)
        (out / "a.txt").write_text("x")

    first = cache_folder("unit", "k1", make, "making")
    assert cache_folder("unit", "k1", make, "making") == first and len(calls) == 1

    def broken(out):
        (out / "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache_folder("unit", "k2", broken, "making")
    assert not (first.parent / "k2").exists()
    assert not [p for p in first.parent.iterdir() if ".tmp-" in p.name]


def test_synthetic_set_is_generated_once() -> None:
    a = sp.load_synthetic_speech(3, 2)
    b = sp.load_synthetic_speech(3, 2)
    assert np.array_equal(a.x_train, b.x_train) and a.labels == sp.LABELS


# ---------------------------------------------------------------- the user's recordings


def _tone(freq: float, rate: int, seconds: float = 0.5, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def _folder(root, speakers: int = 10) -> None:
    for label, freq in (("left", 500.0), ("right", 1500.0)):
        (root / label).mkdir(parents=True)
        for s in range(speakers):
            sf.write(root / label / f"spk{s:02d}_nohash_0.wav", _tone(freq, 16000), 16000)
    (root / "_background_noise_").mkdir()
    sf.write(root / "_background_noise_" / "noise.wav", _tone(50, 16000, 3.0), 16000)


def test_a_recordings_folder_is_read_and_split_by_speaker(tmp_path) -> None:
    _folder(tmp_path, speakers=20)
    assert is_speech_folder(tmp_path)
    data = load_speech_folder(tmp_path, 0.3)
    assert data.labels == ("left", "right")  # _background_noise_ is not a label
    assert len(data.x_train) + len(data.x_val) == 40 and len(data.x_val) > 0
    assert data.x_train.shape[1] == sp.CLIP


def test_a_recordings_folder_under_home_is_read_as_written(tmp_path, monkeypatch) -> None:
    """data.path=~/... reaches the reader unexpanded (a shell leaves '~' after '=' alone)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    _folder(tmp_path / "speech", speakers=4)
    assert is_speech_folder("~/speech")
    assert load_speech_folder("~/speech", 0.3).labels == ("left", "right")


def test_validation_list_is_obeyed(tmp_path) -> None:
    _folder(tmp_path, speakers=3)
    (tmp_path / "validation_list.txt").write_text("left/spk00_nohash_0.wav\n")
    data = load_speech_folder(tmp_path, 0.5)
    assert len(data.x_val) == 1 and data.y_val.tolist() == [0]


def test_other_rates_and_stereo_are_resampled_to_mono_16k(tmp_path) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, _tone(1000.0, 44100, 1.0, channels=2), 44100, subtype="PCM_24")
    x = read_wav(path)
    assert x.ndim == 1 and x.size == 16000
    assert np.argmax(np.abs(np.fft.rfft(x))) == 1000


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"not a wav at all", "not a readable audio file"), (None, "no audio samples")],
)
def test_bad_files_are_named(tmp_path, content, match) -> None:
    path = tmp_path / "bad.wav"
    if content is None:
        sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=rf"{path}: {match}"):
        read_wav(path)


def test_too_long_files_are_refused(tmp_path) -> None:
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(16000 * 3, dtype=np.float32), 16000)
    with pytest.raises(DataError, match="at most 2 s"):
        read_wav(path, max_seconds=2)
