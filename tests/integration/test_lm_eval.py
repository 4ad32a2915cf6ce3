"""EleutherAI's lm-evaluation-harness against ``cadence serve``, in this process.

The server is the scripted cycle GPT (serve_helpers.py), on 127.0.0.1 with an API key; tasks are
YAML files in a temporary folder reading local JSONL (``dataset_path: json``), so nothing reaches
the network. ``local-completions`` gets ``base_url`` alone and finds the server's tokenizer by
itself (``/tokenizer_info``, ``/tokenize``); its multiple-choice accuracy must equal the one
computed from the model's own forward pass, and its generation task the exact match of a direct
greedy generation. ``local-chat-completions`` runs a generation task through the chat endpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from serve_helpers import KEY, LIMIT, Server, cycle_lm_run, serve

from cadence.data.chat import TEMPLATE_FILE, encode_prompt, jinja_renderer
from cadence.data.tokenizers import ByteTokenizer
from cadence.deploy.rundir import LoadedRun
from cadence.models.generate import SamplingParams, generate

# The cycle model continues "def é(x)+ghijklmnopq" from the last byte it sees. Gold answers
# are sometimes that continuation and sometimes not, so the accuracy is neither 0 nor 1.
MC = [
    {"question": "de", "choices": ["f é", "zz"], "label": 0},
    {"question": "gh", "choices": ["qq", "ijk"], "label": 1},
    {"question": "(x", "choices": [")+g", "aaa"], "label": 1},
    {"question": "kl", "choices": ["mno", "pq"], "label": 0},
    {"question": "zq", "choices": ["de", "xx"], "label": 1},
]
GEN = [
    {"question": "de", "answer": "f é(x)"},
    {"question": "gh", "answer": "ijklmnopqdef é(x)"},
    {"question": "é(", "answer": "wrong"},
    {"question": "zd", "answer": "ef é(x)"},  # what a chat answer (after "d") always is
]
# answers open with "d" (the generation prompt) and close with "jk" (see test_openai_chat.py)
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}d{% endif %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}jk{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}d{% endif %}"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    run = cycle_lm_run(tmp_path_factory.mktemp("lmeval") / "run")
    (run / TEMPLATE_FILE).write_text(TEMPLATE)
    yield from serve(run, LIMIT, api_key=KEY)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    for name, rows in (("mc", MC), ("gen", GEN)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = lambda name: f"{{data_files: {{test: {root / name}.jsonl}}}}"  # noqa: E731
    (root / "cadence_mc.yaml").write_text(
        "task: cadence_mc\ndataset_path: json\n"
        f"dataset_kwargs: {data('mc')}\ntest_split: test\n"
        "output_type: multiple_choice\ntarget_delimiter: ''\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    for task, until in (("cadence_gen", "+"), ("cadence_chat", "+")):
        (root / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\n"
            f"dataset_kwargs: {data('gen')}\ntest_split: test\n"
            'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
            'doc_to_target: "{{answer}}"\n'
            f"generation_kwargs: {{until: ['{until}'], max_gen_toks: 20, do_sample: false}}\n"
            "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n"
        )
    return root


def _evaluate(monkeypatch: pytest.MonkeyPatch, tasks: Path, model: str, args: dict, names: list):
    import lm_eval  # a dev dependency; imported here, not at collection
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tasks / "hf-cache"))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=args,
        tasks=names,
        task_manager=manager,
        bootstrap_iters=0,
        log_samples=False,
        apply_chat_template=model == "local-chat-completions",
    )
    return out["results"]


def _loglikelihood(run: LoadedRun, context: str, continuation: str) -> float:
    tok = ByteTokenizer()
    ctx, cont = tok.encode(context).tolist(), tok.encode(continuation).tolist()
    with torch.no_grad():
        logits = run.model(torch.tensor([ctx + cont]))  # type: ignore[operator]
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def _greedy(run: LoadedRun, prompt: list[int], stop: str) -> str:
    ids = generate(run.model, prompt, SamplingParams(20, temperature=0.0))  # type: ignore[arg-type]
    return ByteTokenizer().decode(list(ids)).split(stop)[0]


def test_the_harness_scores_and_generates_through_local_completions(
    server: Server, tasks: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = {
        "base_url": f"{server.url}/v1/completions",
        "model": "cycle",
        "batch_size": 2,
        "auth_token": KEY,  # lm-eval sends it to the tokenizer endpoints
        "max_length": 32,
    }
    results = _evaluate(
        monkeypatch, tasks, "local-completions", args, ["cadence_mc", "cadence_gen"]
    )
    run = server.run
    right = [
        max(range(2), key=lambda k: _loglikelihood(run, d["question"], d["choices"][k]))
        == d["label"]
        for d in MC
    ]
    assert 0 < sum(right) < len(MC)
    assert results["cadence_mc"]["acc,none"] == pytest.approx(sum(right) / len(MC))
    tok = ByteTokenizer()
    matches = [_greedy(run, tok.encode(d["question"]).tolist(), "+") == d["answer"] for d in GEN]
    assert 0 < sum(matches) < len(GEN)
    assert results["cadence_gen"]["exact_match,none"] == pytest.approx(sum(matches) / len(GEN))


def test_the_harness_chats_through_local_chat_completions(
    server: Server, tasks: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = {"base_url": f"{server.url}/v1/chat/completions", "model": "cycle"}
    results = _evaluate(monkeypatch, tasks, "local-chat-completions", args, ["cadence_chat"])
    render, tok = jinja_renderer(TEMPLATE), ByteTokenizer()
    matches = []
    for d in GEN:
        prompt = encode_prompt([{"role": "user", "content": d["question"]}], tok.encode, render)
        answer = _greedy(server.run, prompt.tolist(), "+").split("jk")[0]
        matches.append(answer == d["answer"])
    assert 0 < sum(matches) < len(GEN)
    assert results["cadence_chat"]["exact_match,none"] == pytest.approx(sum(matches) / len(GEN))
