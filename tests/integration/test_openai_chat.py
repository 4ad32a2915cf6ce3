"""``POST /v1/chat/completions`` and ``GET /v1/models`` driven by the official ``openai`` client.

The server is the scripted cycle GPT of serve_helpers.py (its greedy output is known text), with
a chat template saved in its run directory whose generation prompt ends in a byte of the cycle
and whose answers close with ``jk``, a piece of the cycle: so the reference for every answer is
a direct greedy generation from the prompt that :func:`encode_prompt` builds, cut where the
template closes an answer. Servers bind 127.0.0.1 and stop with their fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import KEY, LIMIT, Server, cycle_lm_run, serve

from cadence.data.chat import DEFAULT_TEMPLATE, TEMPLATE_FILE, encode_prompt, jinja_renderer
from cadence.data.tokenizers import ByteTokenizer
from cadence.deploy.chat_api import chat_template
from cadence.deploy.rundir import load_run
from cadence.models.generate import SamplingParams, generate

# Renders every turn's content back to back; an answer opens with "d" (the generation prompt)
# and closes with "jk"; from which the cycle model writes "ef é(x)+ghi" and then "jk".
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}d{% endif %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}jk{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}d{% endif %}"
)
ASK = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = cycle_lm_run(tmp_path_factory.mktemp("chat") / "run")
    (run / TEMPLATE_FILE).write_text(TEMPLATE)
    return run


@pytest.fixture(scope="module")
def server(chat_run: Path) -> Iterator[Server]:
    yield from serve(chat_run, LIMIT, api_key=KEY)


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    base = f"http://127.0.0.1:{server.port}/v1"
    with openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=30) as c:
        yield c


def _reference(run_dir: Path, messages: list[dict[str, str]], n: int) -> tuple[list[int], str]:
    """The prompt the server should build, and the greedy text it should answer with."""
    run = load_run(run_dir)
    tok = ByteTokenizer()
    prompt = encode_prompt(messages, tok.encode, jinja_renderer(TEMPLATE)).tolist()
    ids = list(generate(run.model, prompt, SamplingParams(n, temperature=0.0)))  # type: ignore[arg-type]
    return prompt, tok.decode(ids)


def test_a_chat_answer_is_the_greedy_generation_cut_where_the_template_closes_answers(
    client: openai.OpenAI, chat_run: Path
) -> None:
    out = client.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=40)
    prompt, greedy = _reference(chat_run, ASK, 40)
    assert greedy.startswith("ef é(x)+ghijk")
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == greedy.split("jk")[0]
    assert choice.finish_reason == "stop"
    assert out.usage is not None and out.usage.prompt_tokens == len(prompt)


def test_earlier_turns_are_rendered_as_training_renders_them(
    client: openai.OpenAI, chat_run: Path
) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "and"},
    ]
    out = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=6)
    prompt, greedy = _reference(chat_run, messages, 6)
    assert ByteTokenizer().decode(prompt) == "be briefhidyojkandd"
    assert out.usage is not None and out.usage.prompt_tokens == len(prompt)
    assert out.choices[0].message.content == greedy and out.choices[0].finish_reason == "length"


def test_the_stream_concatenates_to_the_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=40)
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=ASK,
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_client_stop_strings_cut_the_answer(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="m", messages=ASK, temperature=0, max_tokens=40, stop=["(x"]
    )
    assert out.choices[0].message.content == "ef é" and out.choices[0].finish_reason == "stop"


def test_models_lists_the_served_model(client: openai.OpenAI, chat_run: Path) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [chat_run.name]
    assert models.data[0].model_extra["max_model_len"] == 32  # type: ignore[index]


def test_bad_requests_are_openai_errors_naming_the_field_and_the_server_goes_on(
    client: openai.OpenAI, server: Server
) -> None:
    cases = [
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"messages": ASK, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": ASK, "logprobs": True, "stream": True}, "logprobs"),
        ({"messages": ASK, "logprobs": True, "max_tokens": 40}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "y" * 40}]}, "messages"),
        ({"messages": ASK, "max_tokens": LIMIT + 1}, "max_tokens"),
        ({"messages": ASK, "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0"),
    ]
    for body, field in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="m", **body)  # type: ignore[call-overload]
        error = err.value.body
        assert isinstance(error, dict) and error["message"].startswith(field), (body, error)
    out = client.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=3)
    assert out.choices[0].message.content == "ef "
    # the key guards the new endpoints
    for path in ("/v1/models", "/v1/chat/completions"):
        r = httpx.request(
            "GET" if path.endswith("models") else "POST", f"{server.url}{path}", json={}
        )
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_a_run_without_a_template_chats_in_cadences_default(tmp_path: Path) -> None:
    run = cycle_lm_run(tmp_path / "plain")
    assert chat_template(load_run(run)) == DEFAULT_TEMPLATE
    prompt = encode_prompt(ASK, ByteTokenizer().encode, jinja_renderer(DEFAULT_TEMPLATE))
    assert ByteTokenizer().decode(prompt.tolist()) == "<|user|>\nx\n<|assistant|>\n"


def _post(server: Server, path: str, body: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}"}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=30)


def test_the_tokenizer_endpoints_are_the_served_tokenizer(server: Server) -> None:
    info = httpx.get(f"{server.url}/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"})
    assert info.status_code == 200
    got = info.json()
    assert got["eos_token"] is None and "eos_token" in got  # a byte tokenizer has none
    assert got["chat_template"] == TEMPLATE and got["model_max_length"] == 32
    out = _post(server, "/tokenize", {"prompt": "def é", "add_special_tokens": False}).json()
    assert out == {"tokens": list("def é".encode()), "count": 6, "max_model_len": 32}
    chat = _post(server, "/tokenize", {"messages": ASK}).json()
    render = jinja_renderer(TEMPLATE)
    assert chat["tokens"] == encode_prompt(ASK, ByteTokenizer().encode, render).tolist()
    back = _post(server, "/detokenize", {"tokens": out["tokens"]}).json()
    assert back == {"prompt": "def é"}
    for path, body, field in [
        ("/detokenize", {"tokens": [1, 300]}, "tokens.1"),
        ("/tokenize", {"prompt": "a", "messages": ASK}, "body"),
        ("/tokenize", {"messages": [{"role": "x", "content": "a"}]}, "messages.0.role"),
    ]:
        r = _post(server, path, body)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(field), r.text


def test_chat_logprobs_are_the_models_own(client: openai.OpenAI, chat_run: Path) -> None:
    import torch

    out = client.chat.completions.create(
        model="m", messages=ASK, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    prompt, greedy = _reference(chat_run, ASK, 6)
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    answer = out.choices[0].message.content
    assert answer == greedy and b"".join(bytes(c.bytes) for c in content) == answer.encode()
    ids = prompt + list(greedy.encode())
    run = load_run(chat_run)
    with torch.no_grad():
        logp = torch.log_softmax(run.model(torch.tensor([ids]))[0].float(), dim=-1)  # type: ignore[operator]
    for k, c in enumerate(content):
        pos = len(prompt) + k
        assert c.logprob == pytest.approx(float(logp[pos - 1, ids[pos]]), abs=1e-5)
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
