"""``POST /v1/completions`` driven by the official ``openai`` client, plus the text logic under it.

The first part checks the pure pieces: :class:`StopMatcher` against a plain reference on many
token splits, :class:`CompletionText` (UTF-8, stop strings, end of sequence) and the engine's
job cancellation. The second starts real uvicorn servers on 127.0.0.1 (serve_helpers.py) for
the trained tiny run the other serving tests use, and for a scripted GPT whose greedy output is
varied text (``cycle_lm_run``), so stop strings can be taken from it and cut it somewhere in the
middle. Nothing here reaches beyond loopback.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_helpers import KEY, LIMIT, Server, cycle_lm_run, read_events, serve

from cadence.data.tokenizers import ByteTokenizer
from cadence.deploy.engine import Engine, Job, ServeSettings, Work
from cadence.deploy.kinds.lm import GenerateWork
from cadence.deploy.openai_api import CompletionText, StopMatcher
from cadence.deploy.rundir import LoadedRun, load_run
from cadence.deploy.serve_metrics import Metrics
from cadence.models.generate import SamplingParams, generate

PROMPT = "def "


# ---------------------------------------------------------------- stop strings, pure


def reference_cut(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    """What OpenAI returns: the text up to the first piece that completes a stop string, cut
    before the earliest stop string in it."""
    text = ""
    for piece in pieces:
        text += piece
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[: min(hits)], True
    return text, False


def visible(text: str, stops: list[str]) -> str:
    """``text`` less its longest suffix that could still grow into a stop string."""
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold]


def run_matcher(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    """Stream ``pieces`` through a StopMatcher, checking what it shows after every piece."""
    matcher, shown, seen = StopMatcher(stops), "", ""
    for piece in pieces:
        shown += matcher.push(piece)
        seen += piece
        if matcher.stopped:
            return shown, True
        assert shown == visible(seen, stops), (pieces, stops)  # holds back exactly that
    return shown + matcher.flush(), False


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    return [text[a:b] for a, b in zip(bounds, bounds[1:])] or [""]


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["hel", "lo w", "orld"], ["wor"], ("hello ", True)),
        (list("hello world"), ["wor"], ("hello ", True)),
        (["hello world"], ["wor"], ("hello ", True)),
        (["ab", "ab"], ["ab"], ("", True)),
        (["x", "a", "b", "c"], ["bc", "abcd"], ("xa", True)),  # first to complete wins
        (["xabc", "d"], ["bc", "abcd"], ("xa", True)),
        (["xab", "cd"], ["abcd", "bc"], ("x", True)),  # both complete: the earlier wins
        (["a", "a", "x"], ["ab"], ("aax", False)),  # held back, then released
        (["é(", "x)+", "g"], [")+g", "zz"], ("é(x", True)),
        (["abc"], [], ("abc", False)),
        (["a", "b"], ["bx"], ("ab", False)),  # held at the end, flushed
    ],
)
def test_stop_matcher_cases(
    pieces: list[str], stops: list[str], expected: tuple[str, bool]
) -> None:
    assert reference_cut(pieces, stops) == expected
    assert run_matcher(pieces, stops) == expected


def test_stop_matcher_shows_what_cannot_start_a_stop() -> None:
    m = StopMatcher(["ab"])
    assert [m.push(p) for p in ["a", "a", "x"]] == ["", "a", "ax"]
    with pytest.raises(ValueError, match="stop"):
        StopMatcher(["x", ""])


ALPHABET = "ab€\n"


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(ALPHABET, max_size=24),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=4),
    cuts=st.lists(st.integers(0, 24), max_size=12),
)
def test_stop_matcher_matches_the_reference_on_any_split(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    pieces = split(text, cuts)
    shown, stopped = run_matcher(pieces, stops)
    assert (shown, stopped) == reference_cut(pieces, stops)
    assert stopped or shown == text
    assert not any(s in shown for s in stops)


def test_completion_text_keeps_characters_whole_and_cuts_at_stops() -> None:
    tok = ByteTokenizer()
    ids = [int(t) for t in tok.encode("héllo wörld")]

    def feed(text: CompletionText) -> list[str]:
        pieces = []
        for t in ids:
            pieces.append(text.push(t))
            if text.finished:
                return pieces
        return [*pieces, text.finish()]

    plain = CompletionText(tok)
    pieces = feed(plain)
    assert "".join(pieces) == plain.text == "héllo wörld" and plain.finish_reason == "length"
    assert not any("\ufffd" in p for p in pieces)

    cut = CompletionText(tok, ["ö"])
    assert "".join(feed(cut)) == cut.text == "héllo w" and cut.finish_reason == "stop"
    assert cut.tokens == ids[: len("héllo wö".encode())]  # stopped at the stop string
    with pytest.raises(RuntimeError):
        cut.push(ids[-1])

    held = CompletionText(tok, ["ld!"])
    assert "".join(feed(held)) == held.text == "héllo wörld" and held.finish_reason == "length"

    eos = CompletionText(tok, eos_token_id=ord("o"))
    assert "".join(feed(eos)) == eos.text == "héll" and eos.finish_reason == "stop"
    assert eos.tokens == ids[: len("héllo".encode())]  # the EOS id is counted, not shown


# ---------------------------------------------------------------- engine cancellation


@pytest.fixture(scope="module")
def cycle_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cycle_lm_run(tmp_path_factory.mktemp("openai") / "cycle")


class Recorder:
    """A job's events, cancelling the job itself after ``cancel_after`` tokens."""

    def __init__(self, work: Work, max_new_tokens: int, cancel_after: int | None = None) -> None:
        self.tokens: list[int] = []
        self.ended = threading.Event()
        self.end: str | None = None
        self.cancel_after = cancel_after
        params = SamplingParams(max_new_tokens, temperature=0.0)
        self.job = Job(work=work, emit=self.emit, prompt=[100, 101, 102, 32], params=params)

    def emit(self, kind: str, value: Any) -> None:
        if kind == "token":
            assert self.end is None
            self.tokens.append(value)
            if len(self.tokens) == self.cancel_after:
                self.job.cancel()
        else:
            self.end = kind
            self.ended.set()


@pytest.fixture
def engine_and_forwards(cycle_run: Path) -> Iterator[tuple[Engine, list[int]]]:
    run = load_run(cycle_run)
    forwards: list[int] = []
    run.model.register_forward_hook(lambda *_: forwards.append(1))
    engine = Engine(run, ServeSettings(batch_wait_s=0.3), Metrics())
    try:
        yield engine, forwards
    finally:
        engine.close()


@pytest.mark.parametrize("max_new_tokens", [20, 40], ids=["fits", "slides"])
def test_engine_stops_a_cancelled_job(
    engine_and_forwards: tuple[Engine, list[int]], max_new_tokens: int
) -> None:
    engine, forwards = engine_and_forwards
    rec = Recorder(GenerateWork(engine.run), max_new_tokens, cancel_after=3)
    engine.submit(rec.job)
    assert rec.ended.wait(10) and rec.end == "done"
    assert len(rec.tokens) == 3 and len(forwards) == 3  # one forward per token, none after


def test_engine_stops_a_batch_once_no_row_wants_tokens(
    engine_and_forwards: tuple[Engine, list[int]],
) -> None:
    engine, forwards = engine_and_forwards
    work = GenerateWork(engine.run)  # one work: the two jobs share a batch
    a, b = Recorder(work, 20, cancel_after=2), Recorder(work, 20, cancel_after=4)
    engine.submit(a.job)
    engine.submit(b.job)
    assert a.ended.wait(10) and b.ended.wait(10)
    assert engine.metrics.batches == 1 and engine.metrics.batched_jobs == 2
    assert len(a.tokens) == 2 and len(b.tokens) == 4
    assert a.tokens == b.tokens[:2]
    assert len(forwards) == 4  # the prefill and three decode steps, not 20


def test_engine_skips_a_job_cancelled_while_queued(
    engine_and_forwards: tuple[Engine, list[int]],
) -> None:
    engine, forwards = engine_and_forwards
    rec = Recorder(GenerateWork(engine.run), 20)
    rec.job.cancel()
    engine.submit(rec.job)
    assert rec.ended.wait(10) and rec.end == "done"
    assert rec.tokens == [] and forwards == [] and engine.metrics.batches == 0


# ---------------------------------------------------------------- servers and clients


@pytest.fixture(scope="module")
def cycle_server(cycle_run: Path) -> Iterator[Server]:
    yield from serve(cycle_run, LIMIT, api_key=KEY)


@pytest.fixture(scope="module")
def eos_server(cycle_run: Path) -> Iterator[Server]:
    """The cycle model with ``+`` as its tokenizer's end-of-sequence token."""
    run = load_run(cycle_run)
    run.tokenizer.eos_token_id = ord("+")  # type: ignore[union-attr]
    yield from serve(run, LIMIT)


def _client(server: Server, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key=api_key, max_retries=0, timeout=30
    )


@pytest.fixture(params=["lm_server", "cycle_server"], ids=["trained", "cycle"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[Server, openai.OpenAI]]:
    """Each server with a client; the trained run's server takes any key, the cycle's ``KEY``."""
    server: Server = request.getfixturevalue(request.param)
    with _client(server, KEY if request.param == "cycle_server" else "x") as client:
        yield server, client


@pytest.fixture
def cycle(cycle_server: Server) -> Iterator[openai.OpenAI]:
    with _client(cycle_server, KEY) as client:
        yield client


def _greedy(run: LoadedRun, prompt: str, n: int) -> list[int]:
    ids = [int(t) for t in run.tokenizer.encode(prompt)]  # type: ignore[union-attr]
    return list(generate(run.model, ids, SamplingParams(n, temperature=0.0)))  # type: ignore[arg-type]


def _stream(client: openai.OpenAI, **kw: Any) -> list[Any]:
    return list(client.completions.create(model="m", prompt=PROMPT, stream=True, **kw))


def _check_stream(chunks: list[Any], text: str, finish_reason: str) -> None:
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == finish_reason
    assert len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks)
    if "\ufffd" not in text:  # sampled bytes can be invalid UTF-8; otherwise no split character
        assert not any("\ufffd" in c.choices[0].text for c in chunks)


# ---------------------------------------------------------------- /v1/completions


def test_completion_is_the_greedy_generation(served: tuple[Server, openai.OpenAI]) -> None:
    server, client = served
    out = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0, seed=0)
    tok = server.run.tokenizer
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == "m"
    assert len(out.choices) == 1
    choice = out.choices[0]
    assert choice.text == tok.decode(_greedy(server.run, PROMPT, 8))  # type: ignore[union-attr]
    assert choice.finish_reason == "length" and choice.index == 0 and choice.logprobs is None
    prompt_tokens = len(tok.encode(PROMPT))  # type: ignore[union-attr]
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, 8)
    assert out.usage.total_tokens == prompt_tokens + 8


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 3}],
    ids=["greedy", "seeded"],
)
def test_stream_concatenates_to_the_completion(
    served: tuple[Server, openai.OpenAI], sampling: dict[str, Any]
) -> None:
    _, client = served
    full = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, **sampling)
    chunks = _stream(client, max_tokens=12, **sampling)
    _check_stream(chunks, full.choices[0].text, "length")
    assert all(c.usage is None for c in chunks)


def test_stream_usage_comes_last_when_asked_for(cycle: openai.OpenAI) -> None:
    full = cycle.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = _stream(cycle, max_tokens=8, temperature=0, stream_options={"include_usage": True})
    *text_chunks, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(PROMPT), 8)
    assert last.usage.total_tokens == len(PROMPT) + 8
    assert all(c.usage is None for c in text_chunks)
    _check_stream(text_chunks, full.choices[0].text, "length")


@pytest.mark.parametrize("where", [(0, 2), (8, 10), (14, 17)], ids=["start", "middle", "wrap"])
def test_stop_string_from_the_greedy_text_cuts_it(
    cycle_server: Server, cycle: openai.OpenAI, where: tuple[int, int]
) -> None:
    kw: dict[str, Any] = {"model": "m", "prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    full = cycle.completions.create(**kw).choices[0].text
    stop = full[where[0] : where[1]]
    cut = full[: full.find(stop)]
    out = cycle.completions.create(**kw, stop=[stop, "never\x00"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    # Generation ended with the token that completed the stop string.
    assert out.usage is not None
    assert out.usage.completion_tokens == len(cycle_server.run.tokenizer.encode(cut + stop))  # type: ignore[union-attr]
    _check_stream(_stream(cycle, max_tokens=30, temperature=0, stop=stop), cut, "stop")


def test_text_held_back_for_a_stop_string_that_never_completes(cycle: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "m", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    full = cycle.completions.create(**kw).choices[0].text
    near = [full[-1] + "\x00", full[3:6] + "\x00"]  # prefixes of these occur; they never do
    out = cycle.completions.create(**kw, stop=near)
    assert out.choices[0].text == full and out.choices[0].finish_reason == "length"
    _check_stream(_stream(cycle, max_tokens=10, temperature=0, stop=near), full, "length")


def test_end_of_sequence_token_ends_the_completion(eos_server: Server) -> None:
    expected = _greedy(eos_server.run, PROMPT, 20)
    k = expected.index(ord("+"))
    text = eos_server.run.tokenizer.decode(expected[:k])  # type: ignore[union-attr]
    assert 0 < k < 20 and text
    with _client(eos_server, "x") as client:
        out = client.completions.create(model="m", prompt=PROMPT, max_tokens=20, temperature=0)
        assert out.choices[0].text == text and out.choices[0].finish_reason == "stop"
        assert out.usage is not None and out.usage.completion_tokens == k + 1
        _check_stream(_stream(client, max_tokens=20, temperature=0), text, "stop")
    body = {"prompt": PROMPT, "max_new_tokens": 20, "temperature": 0.0}
    r = httpx.post(f"{eos_server.url}/v1/generate", json=body, timeout=30).json()
    assert r["tokens"] == expected[: k + 1] and r["text"] == text
    assert r["finish_reason"] == "stop" and r["completion_tokens"] == k + 1


def test_defaults_and_fields_the_client_may_send(served_lm_run: Path, lm_server: Server) -> None:
    body = {
        "prompt": [PROMPT],
        "n": 1,
        "user": "u",
        "logprobs": None,
        "echo": False,
        "best_of": 1,
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "a_field_from_the_future": {"x": 1},
    }
    r = httpx.post(f"{lm_server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == served_lm_run.name  # the run directory's name
    assert out["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens
    text = httpx.get(f"{lm_server.url}/metrics").text
    assert 'cadence_requests_total{path="/v1/completions",status="200"}' in text


# ---------------------------------------------------------------- errors and auth


def test_errors_are_openai_errors_naming_the_field(lm_server: Server) -> None:
    with _client(lm_server, "x") as client:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="m", prompt=PROMPT, max_tokens=LIMIT + 1)
        assert info.value.status_code == 400 and info.value.param == "max_tokens"
        assert "max_tokens" in str(info.value) and f"limit of {LIMIT}" in str(info.value)
        for kw, field in [
            ({"n": 2}, "n"),
            ({"prompt": [[1, 999]]}, "prompt"),  # a token id outside the vocabulary
            ({"prompt": [[1], [2, -1]]}, "prompt.1"),
            ({"prompt": []}, "prompt"),
            ({"prompt": [1, "a"]}, "prompt"),
            ({"prompt": [[1]] * 65}, "prompt"),  # over the server's batch limit
            ({"logprobs": 21}, "logprobs"),
            ({"prompt": "y" * 30, "echo": True, "max_tokens": 5}, "prompt"),  # scored: no slide
            ({"prompt": ["a", "b"], "stream": True}, "stream"),
            ({"temperature": 2.5}, "temperature"),
            ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ]:
            with pytest.raises(openai.BadRequestError) as info:
                client.completions.create(**{"model": "m", "prompt": PROMPT, **kw})
            assert info.value.param == field
            assert info.value.body["message"].startswith(f"{field}: ")  # type: ignore[index]
        ok = client.completions.create(model="m", prompt=[[1, 2]], echo=True, max_tokens=0)
        assert ok.choices[0].finish_reason == "length"  # the engine goes on
        with pytest.raises(openai.APIStatusError) as status:
            client.completions.create(model="m", prompt="y" * 33)
        assert status.value.status_code == 413 and "context of 32 tokens" in str(status.value)
    r = httpx.post(f"{lm_server.url}/v1/completions", content=b'{"prompt": ')
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("body: malformed JSON")
    # /v1/generate keeps its own error shape.
    r = httpx.post(f"{lm_server.url}/v1/generate", json={"prompt": "x", "max_new_tokens": 999})
    assert r.status_code == 400 and r.json()["error"].startswith("max_new_tokens")


def test_api_key_is_checked(cycle_server: Server, cycle: openai.OpenAI) -> None:
    with (
        _client(cycle_server, "wrong") as client,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        client.completions.create(model="m", prompt=PROMPT, max_tokens=2)
    assert info.value.code == "invalid_api_key" and "bearer token" in str(info.value)
    assert cycle.completions.create(model="m", prompt=PROMPT, max_tokens=2).choices[0].text
    r = httpx.post(f"{cycle_server.url}/v1/generate", json={"prompt": "x"})
    assert r.status_code == 401 and "bearer token" in r.json()["error"]  # unchanged shape


# ---------------------------------------------------------------- stop on /v1/generate


def test_generate_takes_stop_strings(cycle_server: Server) -> None:
    url, auth = f"{cycle_server.url}/v1/generate", {"Authorization": f"Bearer {KEY}"}
    body: dict[str, Any] = {"prompt": PROMPT, "max_new_tokens": 20, "temperature": 0.0}
    full = httpx.post(url, json=body, headers=auth, timeout=30).json()
    assert full["finish_reason"] == "length" and len(full["tokens"]) == 20
    stop = full["text"][6:8]
    cut = full["text"][: full["text"].find(stop)]
    out = httpx.post(url, json={**body, "stop": [stop]}, headers=auth, timeout=30).json()
    assert out["text"] == cut and out["finish_reason"] == "stop"
    assert out["tokens"] == full["tokens"][: len(out["tokens"])] and len(out["tokens"]) < 20
    with httpx.stream(
        "POST", url, json={**body, "stop": [stop], "stream": True}, headers=auth, timeout=30
    ) as r:
        pieces, done = read_events(r)
    assert done == out
    assert "".join(p["text"] for p in pieces) == cut
    assert [p["token"] for p in pieces if p["token"] is not None] == out["tokens"]
    for bad in ("a", [""], [1]):
        r = httpx.post(url, json={**body, "stop": bad}, headers=auth)
        assert r.status_code == 422 and r.json()["error"].startswith("stop"), r.text


# ---------------------------------------------------------------- scoring: echo and logprobs


def _direct_logprobs(run: LoadedRun, ids: list[int]) -> torch.Tensor:
    """log p(next token) at every position of one sequence, from one plain forward pass."""
    with torch.no_grad():
        logits = run.model(torch.tensor([ids]))  # type: ignore[operator]
    return torch.log_softmax(logits[0].float(), dim=-1)


def test_a_batch_of_token_id_prompts_is_scored_as_a_direct_forward_pass(lm_server: Server) -> None:
    run = lm_server.run
    prompts = [[100, 101, 102, 32, 102], [40, 41], [10, 60, 61, 62, 63, 64, 65]]
    with _client(lm_server, "x") as client:
        out = client.completions.create(
            model="m", prompt=prompts, echo=True, logprobs=5, max_tokens=0
        )
    assert [c.index for c in out.choices] == [0, 1, 2]
    tok = run.tokenizer
    for ids, c in zip(prompts, out.choices):
        assert c.text == tok.decode(ids) and c.finish_reason == "length"  # type: ignore[union-attr]
        lp = c.logprobs
        assert lp is not None and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.tokens == [tok.decode([t]) for t in ids]  # type: ignore[union-attr]
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
        direct = _direct_logprobs(run, ids)
        for i in range(1, len(ids)):
            assert lp.token_logprobs[i] == pytest.approx(float(direct[i - 1, ids[i]]), abs=1e-5)
            best = direct[i - 1].topk(5)
            top = lp.top_logprobs[i]
            assert max(top.values()) == pytest.approx(float(best.values[0]), abs=1e-5)
            assert len(top) <= 5
    assert out.usage is not None and out.usage.prompt_tokens == sum(map(len, prompts))


def test_a_greedy_token_is_scored_with_its_prompt(lm_server: Server) -> None:
    """What lm-evaluation-harness sends for a log-likelihood: echo, one token, logprobs 1."""
    run = lm_server.run
    ids = [int(t) for t in run.tokenizer.encode(PROMPT)]  # type: ignore[union-attr]
    with _client(lm_server, "x") as client:
        out = client.completions.create(
            model="m", prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0
        )
        plain = client.completions.create(
            model="m", prompt=PROMPT, logprobs=2, max_tokens=3, temperature=0
        )
    lp = out.choices[0].logprobs
    assert lp is not None and len(lp.token_logprobs) == len(ids) + 1
    direct = _direct_logprobs(run, ids)
    greedy = int(direct[-1].argmax())
    assert out.choices[0].text == PROMPT + run.tokenizer.decode([greedy])  # type: ignore[union-attr]
    assert lp.token_logprobs[-1] == pytest.approx(float(direct[-1, greedy]), abs=1e-5)
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()), abs=1e-6)
    # without echo: the generated tokens alone
    gen = plain.choices[0].logprobs
    assert gen is not None and len(gen.tokens) == 3 and gen.token_logprobs[0] is not None
    assert "".join(gen.tokens) == plain.choices[0].text
