"""workload: speech through the real trainer: synthetic voices and a folder of recordings."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from trainer_helpers import TINY

import cadence
from cadence.config import ConfigError
from cadence.data.audio_files import read_wav
from cadence.data.speech import LABELS

pytestmark = pytest.mark.usefixtures("plots_off")

QUIET = ["workload=speech", "train.progress=false", "train.log_every=5", "batch.size=16"]


def _rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_synthetic_speech_trains_and_keeps_its_labels(tmp_path) -> None:
    # TINY's voices and narrow CNN: the corpus other tests synthesise too (one cache entry)
    cfg = cadence.load_config(
        None, [*QUIET, *TINY["speech"], "train.max_steps=20", "train.eval_every=20"]
    )
    summary = cadence.train(cfg, run_dir=tmp_path / "run")
    rows = _rows(tmp_path / "run")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    evals = [r for r in rows if "val_accuracy" in r]
    assert evals and 0.0 <= evals[-1]["val_accuracy"] <= 1.0
    assert summary["metric"] == "val_accuracy"
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == list(LABELS)


def _recordings(root, speakers: int = 12) -> None:
    """Two words as tones of different pitch, each speaker a little off-key, with noise."""
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    for label, freq in (("high", 1200.0), ("low", 300.0)):
        (root / label).mkdir(parents=True)
        for s in range(speakers):
            f = freq * (1 + 0.05 * rng.standard_normal())
            x = 0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.size)
            sf.write(root / label / f"s{s}_nohash_0.wav", x.astype(np.float32), 16000)


@pytest.fixture(scope="module")
def tones_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A speech run on a folder of two-word "recordings" (tones), shared by the deploy tests."""
    root = tmp_path_factory.mktemp("tones")
    _recordings(root / "data")
    cfg = cadence.load_config(
        None,
        [
            *QUIET,
            f"data.path={root / 'data'}",
            "data.val_fraction=0.3",
            "model.channels=[8,16]",  # a narrow CNN tells two pitches apart as well
            "optimizer.name=adamw",
            "optimizer.lr=0.003",
            "train.max_steps=30",
            "train.eval_every=30",
        ],
    )
    # plots=False: `plots_off` is function-scoped, so it is not in force yet for this fixture
    cadence.train(cfg, run_dir=root / "run", plots=False)
    return root / "run"


def test_a_folder_of_recordings_is_learned(tones_run: Path) -> None:
    assert _rows(tones_run)[-1]["val_accuracy"] == 1.0
    assert json.loads((tones_run / "labels.json").read_text()) == ["high", "low"]


def _tone_wav(path: Path, freq: float, rate: int, seconds: float) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, "PCM_16")
    return path


def test_onnx_export_takes_raw_audio_of_any_length(tones_run: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from cadence.deploy import export_run
    from cadence.deploy.rundir import load_run

    result = export_run(tones_run, "onnx", out=tmp_path / "onnx")
    assert result.max_abs_diff <= result.tolerance
    manifest = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert manifest["input"]["shape"] == ["batch", "samples"]
    assert manifest["labels"] == ["high", "low"]
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    x = torch.from_numpy(read_wav(_tone_wav(tmp_path / "a.wav", 1200.0, 16000, 0.7)))[None]
    model = load_run(tones_run).model
    # a real clip, and noise longer than any clip trained on, at a length no hop divides
    noise = 0.1 * torch.randn(3, 3 * 16000 + 4321, generator=torch.Generator().manual_seed(3))
    for audio in (x, noise):
        got = session.run(None, {"inputs": audio.numpy()})[0]
        with torch.no_grad():
            want = model(audio).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_serve_takes_a_wav_upload(tones_run: Path, tmp_path: Path) -> None:
    from serve_helpers import serve

    from cadence.data.speech import fit_clip

    # 44.1 kHz stereo-free PCM: resampled to 16 kHz on the way in, as in training
    wav = _tone_wav(tmp_path / "high.wav", 1200.0, 44100, 0.8)
    for server in serve(tones_run, 8):
        with open(wav, "rb") as f:
            r = httpx.post(f"{server.url}/v1/predict", files={"file": ("high.wav", f)})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["names"] == ["high"] and out["class_names"] == ["high", "low"]
        x = torch.from_numpy(fit_clip(read_wav(wav)))[None]
        with torch.no_grad():
            want = torch.softmax(server.run.model(x).double(), -1)[0].tolist()
        np.testing.assert_allclose(out["probabilities"][0], want, atol=1e-6)
        # raw samples as JSON: exactly one second of them
        r = httpx.post(f"{server.url}/v1/predict", json={"inputs": [x[0].tolist()]})
        assert r.status_code == 200 and r.json()["names"] == ["high"]
        # base64 16-bit PCM in JSON at 44.1 kHz: resampled like the upload, the same answer
        audio, rate = sf.read(wav, dtype="int16")
        pcm = base64.b64encode(audio.astype("<i2").tobytes()).decode()
        r = httpx.post(f"{server.url}/v1/predict", json={"audio": pcm, "sample_rate": rate})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["probabilities"][0], want, atol=1e-4)

        bad = [
            ({"file": ("notes.txt", b"hello, not audio")}, 422, "file notes.txt: not a readable"),
            ({"other": ("a.wav", b"RIFF")}, 422, "file: missing"),
        ]
        for files, status, needle in bad:
            r = httpx.post(f"{server.url}/v1/predict", files=files)
            assert r.status_code == status and needle in r.json()["error"], r.text
        r = httpx.post(f"{server.url}/v1/predict", json={"inputs": [[0.0] * 100]})
        assert r.status_code == 422 and "expected 16000 numbers" in r.json()["error"]
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # still serving


def test_bad_speech_settings_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="data.voices: must be in 1..160"):
        cadence.load_config(None, [*QUIET, "data.voices=0"])
    with pytest.raises(ConfigError, match="folder of label folders of .wav files"):
        cadence.load_config(None, [*QUIET, f"data.path={tmp_path / 'missing'}"])
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello")
    cfg = cadence.load_config(None, [*QUIET, f"data.path={tmp_path / 'text'}"])
    with pytest.raises(ConfigError, match="Speech Commands layout"):
        cadence.train(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_interrupted_speech_run_resumes_bit_for_bit(make_config, tmp_path: Path) -> None:
    """SpecAugment and dropout draw from the RNG every step: resume must replay them exactly."""
    from resume_helpers import Crash, CrashAt, assert_same_run

    from cadence.run import resume

    cfg = make_config(
        "speech",
        "optimizer.name=muon",
        "optimizer.lr=0.02",
        "batch.size=8",
        "train.max_steps=8",
        "train.checkpoint_every=3",
        "train.eval_every=4",
        "train.log_every=1",
    )
    cadence.train(cfg, run_dir=tmp_path / "straight")
    with pytest.raises(Crash):
        cadence.train(cfg, run_dir=tmp_path / "crashed", callbacks=[CrashAt(5)])
    resume(tmp_path / "crashed")
    assert_same_run(tmp_path / "straight", tmp_path / "crashed", range(1, 9))
