"""The HTTP server, started for real on a free loopback port (uvicorn in a thread).

Each server fixture binds 127.0.0.1:0, waits for uvicorn to start and shuts it down at the end of
the module, so nothing outlives the tests and nothing listens beyond loopback (serve_helpers.py).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_model
from serve_helpers import KEY, LIMIT, Server, read_events, serve

import cadence
from cadence.config import ConfigError, dump_config
from cadence.deploy.rundir import LoadedRun
from cadence.models.generate import SamplingParams, generate
from cadence.workloads import build_model


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier run directory built by hand: config.yaml + weights, no data needed."""
    run_dir = tmp_path_factory.mktemp("serve") / "digits"
    run_dir.mkdir()
    cfg = cadence.load_config(None, ["workload=digits", "model.hidden=[16]", "schedule.warmup=0"])
    torch.manual_seed(0)
    save_model(build_model(cfg), str(run_dir / "model.safetensors"))
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


@pytest.fixture(scope="module")
def auth_server(served_lm_run: Path) -> Iterator[Server]:
    yield from serve(served_lm_run, LIMIT, api_key=KEY)


@pytest.fixture(scope="module")
def clf_server(digits_run: Path) -> Iterator[Server]:
    yield from serve(digits_run, LIMIT)


def _expected(run: LoadedRun, prompt: str, **kw: object) -> list[int]:
    ids = [int(t) for t in run.tokenizer.encode(prompt)]
    return list(generate(run.model, ids, SamplingParams(**kw)))


# ---------------------------------------------------------------- happy paths


def test_health_and_generate(lm_server: Server) -> None:
    h = httpx.get(f"{lm_server.url}/health").json()
    assert h == {"status": "ok", "workload": "lm", "kind": "lm", "auth": False}
    body = {"prompt": "def f(x):", "max_new_tokens": 12, "temperature": 0.0}
    r = httpx.post(f"{lm_server.url}/v1/generate", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    expected = _expected(lm_server.run, "def f(x):", max_new_tokens=12, temperature=0.0)
    assert out["tokens"] == expected
    assert out["text"] == lm_server.run.tokenizer.decode(expected)
    assert out["completion_tokens"] == 12 and out["prompt_tokens"] == len("def f(x):")


def test_json_is_accepted_whatever_the_content_type(lm_server: Server) -> None:
    # `curl -d '{...}'` sends application/x-www-form-urlencoded.
    r = httpx.post(
        f"{lm_server.url}/v1/generate",
        content=json.dumps({"prompt": "x", "max_new_tokens": 2}),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200 and r.json()["completion_tokens"] == 2


def test_generate_slides_past_the_context(lm_server: Server) -> None:
    # 60 new tokens on a 32-token model: served alone, with the same sliding rule as generate().
    body = {"prompt": "import os\n", "max_new_tokens": 60, "temperature": 1.0, "seed": 4}
    out = httpx.post(f"{lm_server.url}/v1/generate", json=body, timeout=30).json()
    kw = {"max_new_tokens": 60, "temperature": 1.0, "seed": 4}
    assert out["tokens"] == _expected(lm_server.run, "import os\n", **kw)


def test_generate_streams_server_sent_events(lm_server: Server) -> None:
    body = {"prompt": "class A", "max_new_tokens": 10, "temperature": 0.0, "stream": True}
    with httpx.stream("POST", f"{lm_server.url}/v1/generate", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        pieces, done = read_events(r)
    assert done is not None
    assert [p["token"] for p in pieces if p["token"] is not None] == done["tokens"]
    assert "".join(p["text"] for p in pieces) == done["text"]
    assert done["tokens"] == _expected(lm_server.run, "class A", max_new_tokens=10, temperature=0.0)


def test_predict_returns_probabilities(clf_server: Server) -> None:
    x = torch.rand(3, 64)
    r = httpx.post(f"{clf_server.url}/v1/predict", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    out = r.json()
    probs = torch.tensor(out["probabilities"])
    with torch.no_grad():
        ref = torch.softmax(clf_server.run.model(x).double(), -1)
    torch.testing.assert_close(probs, ref.to(probs.dtype), atol=1e-6, rtol=1e-5)
    assert out["labels"] == ref.argmax(-1).tolist() and out["classes"] == list(range(10))


def test_metrics_are_prometheus_text(lm_server: Server) -> None:
    httpx.post(f"{lm_server.url}/v1/generate", json={"prompt": "x", "max_new_tokens": 3})
    text = httpx.get(f"{lm_server.url}/metrics").text
    assert 'cadence_requests_total{path="/v1/generate",status="200"}' in text
    assert 'cadence_request_latency_seconds_bucket{path="/v1/generate",le="+Inf"}' in text
    tokens = next(ln for ln in text.splitlines() if ln.startswith("cadence_tokens_generated_total"))
    assert int(tokens.split()[-1]) >= 3


# ---------------------------------------------------------------- auth


def test_auth_required_everywhere_but_health(auth_server: Server) -> None:
    url = auth_server.url
    assert httpx.get(f"{url}/health").status_code == 200
    body = {"prompt": "x", "max_new_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{url}/v1/generate", json=body, headers=headers)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
        assert httpx.get(f"{url}/metrics", headers=headers).status_code == 401
    ok = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{url}/v1/generate", json=body, headers=ok).status_code == 200
    assert httpx.get(f"{url}/metrics", headers=ok).status_code == 200


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ('{"prompt": "x", ', 422, "malformed JSON"),
        ({"max_new_tokens": 3}, 422, "prompt"),
        ({"prompt": 5}, 422, "prompt"),
        ({"prompt": "x", "max_new_tokens": "5"}, 422, "max_new_tokens"),
        ({"prompt": "x", "temperature": "hot"}, 422, "temperature"),
        ({"prompt": "x", "top_p": 1.5}, 422, "top_p"),
        ({"prompt": "x", "stream": "yes"}, 422, "stream"),
        ({"prompt": "x", "colour": 1}, 422, "colour"),
        ([1, 2], 422, "body"),
        ({"prompt": "y" * 33}, 413, "context of 32 tokens"),
        ({"prompt": "x", "max_new_tokens": LIMIT + 1}, 400, f"limit of {LIMIT}"),
        ({"prompt": ""}, 400, "prompt"),
        ({"inputs": [[0.0] * 64]}, 422, "prompt"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_bad_generate_requests(lm_server: Server, body: object, status: int, needle: str) -> None:
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(
        f"{lm_server.url}/v1/generate",
        headers={"content-type": "application/json"},
        timeout=30,
        **kw,
    )
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_wrong_model_kind_is_400(lm_server: Server, clf_server: Server) -> None:
    r = httpx.post(f"{lm_server.url}/v1/predict", json={"inputs": [[0.0] * 64]})
    assert r.status_code == 400 and "/v1/generate" in r.json()["error"]
    r = httpx.post(f"{clf_server.url}/v1/generate", json={"prompt": "x"})
    assert r.status_code == 400 and "/v1/predict" in r.json()["error"]
    r = httpx.post(f"{lm_server.url}/v1/transcribe", json={"audio": ""})
    assert r.status_code == 400 and "/v1/generate" in r.json()["error"]
    # a language model's OpenAI routes answer a classifier's server in OpenAI's error shape
    for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models")]:
        r = httpx.request(method, f"{clf_server.url}{path}")
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "model", r.text
        assert error["message"] == "model: this server holds the digits classifier; use /v1/predict"
    assert httpx.get(f"{clf_server.url}/v1/predict").status_code == 405  # its own route


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [
        ([[0.0] * 63], "inputs.0: expected 64 numbers"),
        ([[0.0] * 64, ["a"] * 64], "inputs.1"),
        ([[0.0] * 64, [[0.0] * 8] * 7 + [[0.0] * 7]], "inputs.1"),
        ([], "inputs"),
        ("x", "inputs"),
    ],
    ids=["short", "strings", "ragged", "empty", "not-a-list"],
)
def test_bad_predict_requests(clf_server: Server, inputs: object, needle: str) -> None:
    r = httpx.post(f"{clf_server.url}/v1/predict", json={"inputs": inputs})
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]


def test_a_file_upload_to_a_non_audio_model_is_415(clf_server: Server) -> None:
    r = httpx.post(f"{clf_server.url}/v1/predict", files={"file": ("x.wav", b"RIFF")})
    assert r.status_code == 415 and r.json()["error"].startswith("file: the digits model")


def test_server_keeps_serving_after_bad_requests(lm_server: Server, clf_server: Server) -> None:
    for _ in range(3):
        httpx.post(f"{lm_server.url}/v1/generate", content=b"{{{")
        httpx.post(f"{lm_server.url}/v1/generate", json={"prompt": "z" * 100})
        httpx.post(f"{clf_server.url}/v1/predict", json={"inputs": [[1.0]]})
    r = httpx.post(f"{lm_server.url}/v1/generate", json={"prompt": "ok", "max_new_tokens": 2})
    assert r.status_code == 200
    assert httpx.post(f"{clf_server.url}/v1/predict", json={"inputs": [[0.5] * 64]}).is_success


# ---------------------------------------------------------------- concurrency


def test_burst_of_concurrent_generations_is_batched_and_correct(lm_server: Server) -> None:
    requests = [
        {
            "prompt": f"def f{i}(x):" + " " * (i % 5),
            "max_new_tokens": 4 + i % 7,
            "temperature": 0.0 if i % 2 else 0.9,
            "seed": i,
            "top_k": None if i % 3 else 20,
        }
        for i in range(24)
    ]

    def batches() -> tuple[int, int]:
        lines = httpx.get(f"{lm_server.url}/metrics").text.splitlines()
        get = lambda name: int(next(ln for ln in lines if ln.startswith(name)).split()[-1])  # noqa: E731
        return get("cadence_batches_total"), get("cadence_batched_jobs_total")

    before = batches()
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(24) as pool:
        responses = list(
            pool.map(lambda b: client.post(f"{lm_server.url}/v1/generate", json=b), requests)
        )
    after = batches()
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for body, r in zip(requests, responses):
        kw = {k: v for k, v in body.items() if k != "prompt"}
        assert r.json()["tokens"] == _expected(lm_server.run, body["prompt"], **kw), body
    n_batches, n_jobs = after[0] - before[0], after[1] - before[1]
    assert n_jobs == 24
    assert n_batches < 24  # at least some requests shared a forward pass


def test_burst_of_concurrent_predictions(clf_server: Server) -> None:
    xs = [torch.rand(1 + i % 3, 64) for i in range(20)]
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(20) as pool:
        responses = list(
            pool.map(
                lambda x: client.post(f"{clf_server.url}/v1/predict", json={"inputs": x.tolist()}),
                xs,
            )
        )
    for x, r in zip(xs, responses):
        assert r.status_code == 200, r.text
        with torch.no_grad():
            ref = torch.softmax(clf_server.run.model(x).double(), -1)
        got = torch.tensor(r.json()["probabilities"], dtype=torch.float64)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- start-up errors


def _serve_args(run_dir: Path) -> argparse.Namespace:
    from cadence.cli.deploy import add_parsers

    parser = argparse.ArgumentParser(prog="cadence")
    add_parsers(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", str(run_dir), "--port", "0"])


def test_missing_or_corrupt_run_dir_fails_with_one_line(tmp_path: Path, digits_run: Path) -> None:
    from rich.console import Console

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.yaml").write_text((digits_run / "config.yaml").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    no_config = tmp_path / "empty"
    no_config.mkdir()
    for bad, needle in [
        (tmp_path / "missing", "run directory not found"),
        (no_config, "config.yaml: not found"),
        (corrupt, "model.safetensors: corrupt"),
    ]:
        args = _serve_args(bad)
        with pytest.raises(ConfigError, match=needle) as info:
            args.func(args, Console())
        assert "\n" not in str(info.value)  # cadence's main prints it as one line, exit 2


def test_main_cli_exits_2_when_wired(tmp_path: Path) -> None:
    from cadence import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "serve" in commands.choices
    assert cli.main(["serve", str(tmp_path / "missing")]) == 2
