"""workload: asr through the real trainer, export and server: CTC on spoken digit strings."""

from __future__ import annotations

import base64
import io
import json
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

import cadence
from cadence.config import ConfigError

pytestmark = pytest.mark.usefixtures("plots_off")

# 12 training voices (192 phrases), a narrow encoder; 80 held-out clips scored per evaluation
SMALL = [
    "workload=asr",
    "data.voices=12",
    "model.d_model=64",
    "model.n_layer=2",
    "optimizer.name=adamw",
    "optimizer.lr=0.004",
    "batch.size=8",
    "train.clip_grad_norm=1.0",
    "train.eval_samples=80",
    "train.progress=false",
]


EVERY = 80  # steps between evaluations; three of them in the run
STEPS = 3 * EVERY


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def asr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("asr") / "run"
    cfg = cadence.load_config(
        None, [*SMALL, f"train.max_steps={STEPS}", f"train.eval_every={EVERY}"]
    )
    # plots=False: `plots_off` is function-scoped, so it is not in force yet for this fixture
    cadence.train(cfg, run_dir=run, plots=False)
    return run


def test_a_few_hundred_steps_transcribe_new_voices_well_below_chance(asr_run: Path) -> None:
    """Chance: an empty or random transcript has CER >= 1 - 1/10 (a random digit matches
    one in ten); the trained model must be far below it, on voices it never heard."""
    evals = [r for r in _rows(asr_run) if "val_cer" in r]
    assert [r["step"] for r in evals] == [EVERY, 2 * EVERY, STEPS]
    assert evals[-1]["val_cer"] < 0.5, evals
    summary = json.loads((asr_run / "summary.json").read_text())
    assert summary["metric"] == "val_cer"
    assert summary["best_metric"] == min(r["val_cer"] for r in evals)  # lower is better


def test_onnx_export_transcribes_like_pytorch(asr_run: Path, tmp_path: Path) -> None:
    from cadence.deploy import export_run

    result = export_run(asr_run, "onnx", out=tmp_path / "onnx", quantize="int8")
    assert result.max_abs_diff <= result.tolerance
    manifest = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert manifest["input"]["shape"] == ["batch", "samples"]
    assert manifest["output"]["name"] == "log_probs"
    q = result.quantization
    assert q is not None and q["val_cer_fp32"] < 0.5 and abs(q["val_cer_change"]) < 0.1
    # beyond the export's own check (two batch sizes, two clip lengths): lengths that no
    # convolution stride divides, long and short, at a third batch size
    import onnxruntime as ort

    from cadence.deploy.rundir import load_run

    model = load_run(asr_run).model
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    gen = torch.Generator().manual_seed(5)
    for batch, samples in [(2, 3 * 16000 + 123), (4, 16000 // 2 + 1)]:
        audio = 0.1 * torch.randn(batch, samples, generator=gen)
        got = session.run(None, {"inputs": audio.numpy()})[0]
        with torch.no_grad():
            want = model(audio).numpy()
        frames = int(model.output_lengths(torch.tensor([samples]))[0])
        assert got.shape == want.shape == (batch, frames, want.shape[-1])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_serve_transcribes_a_wav_upload(asr_run: Path) -> None:
    from serve_helpers import serve

    from cadence.data.digit_strings import load_digit_strings
    from cadence.models.asr import decode_ids, greedy_decode

    data = load_digit_strings(0, 12)
    clip = data.x_val[0]
    buf = io.BytesIO()
    sf.write(buf, clip, 16000, format="WAV", subtype="PCM_16")
    for server in serve(asr_run, 8):
        r = httpx.post(f"{server.url}/v1/transcribe", files={"file": ("a.wav", buf.getvalue())})
        assert r.status_code == 200, r.text
        with torch.no_grad():
            lp = server.run.model(torch.from_numpy(clip.astype(np.float32) / 32768.0)[None])
        want = decode_ids(greedy_decode(lp, torch.tensor([lp.shape[1]]))[0])
        assert r.json()["text"] == want and r.json()["seconds"] == 2.0
        # a short upload is padded to the two seconds the model was trained on
        r = httpx.post(
            f"{server.url}/v1/transcribe", files={"file": ("b.wav", _wav(clip[8000:20000]))}
        )
        assert r.status_code == 200 and r.json()["seconds"] == 2.0
        # base64 16-bit PCM in JSON, the clip's own int16 bytes: the same transcript
        pcm = base64.b64encode(clip.astype("<i2").tobytes()).decode()
        r = httpx.post(f"{server.url}/v1/transcribe", json={"audio": pcm, "sample_rate": 16000})
        assert r.status_code == 200 and r.json()["text"] == want, r.text
        post = partial(httpx.post, f"{server.url}/v1/transcribe")
        errors = [
            (post(json={"inputs": [[0.0]]}), 422, "audio: missing"),
            (post(json={"audio": "not base64!"}), 422, "audio: not valid base64"),
            (post(json={"audio": base64.b64encode(b"abc").decode()}), 422, "two bytes per"),
            (post(json={"audio": ""}), 422, "audio: no samples"),
            (post(json={"audio": pcm, "channels": 2}), 422, "channels: 2"),
            (post(json={"audio": pcm, "sample_rate": "fast"}), 422, "sample_rate"),
            (httpx.post(f"{server.url}/v1/predict", json={"inputs": [[0.0]]}), 400, "transcribe"),
            (
                httpx.post(f"{server.url}/v1/transcribe", files={"file": ("x.wav", b"nope")}),
                422,
                "file x.wav: not a readable audio file",
            ),
        ]
        for response, status, needle in errors:
            assert response.status_code == status and needle in response.json()["error"]


def _wav(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_asr_settings_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.path: workload asr trains on synthetic"):
        cadence.load_config(None, [*SMALL, f"data.path={tmp_path}"])
    with pytest.raises(ConfigError, match="model.arch: 'cnn' is not available for workload 'asr'"):
        cadence.load_config(None, [*SMALL, "model.arch=cnn"])
