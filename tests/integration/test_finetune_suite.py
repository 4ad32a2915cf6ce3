"""The finetune suite's workload: the task is fixed by its seed, the base is the pretrained run's
weights, and exact match is what answering each question alone (generate, one at a time) gives."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import cadence
from cadence.bench import finetune
from cadence.data.chat import DEFAULT_TEMPLATE, jinja_renderer
from cadence.data.tokenizers import ByteTokenizer
from cadence.models.generate import SamplingParams, generate
from cadence.workloads import build_workload
from cli_helpers import run_forked

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = [
    "workload=cadence.bench.finetune:instruction_task",
    "model.n_layer=2",
    "model.d_model=32",
    "model.n_head=2",
    "model.seq_len=64",
    "train.eval_samples=12",
    "train.threads=1",
]


def test_the_task_is_a_pure_function_of_its_seed():
    a, b = finetune.make_task(50, 3), finetune.make_task(50, 3)
    assert a == b and a != finetune.make_task(50, 4)
    for user, answer in a:
        word = user["content"].removeprefix("Upper-case: ")
        assert answer["content"] == word.upper() and 3 <= len(word) <= 8


@pytest.fixture(scope="module")
def task():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(finetune.PRETRAIN, "max_steps", 3)  # the base: pretrained briefly
        # in a child forked from this process rather than a new interpreter (cli_helpers.py)
        mp.setattr(finetune, "_cadence", lambda args: run_forked(*args))
        cfg = cadence.load_config(None, SHAPE)
        base = finetune.pretrained_base(cfg)
        assert finetune.pretrained_base(cfg) == base  # cached: made once
        return build_workload(cfg), base


def test_the_model_starts_from_the_pretrained_weights(task):
    w, base = task
    saved = load_file(str(base / "run" / "model.safetensors"))
    state = w.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert w.metric == "val_exact_match" and w.higher_is_better


def test_exact_match_is_each_question_answered_alone(monkeypatch, task):
    # A task a few steps teach (every answer "OK"), so that answers come out right; half of
    # the expected answers are then changed, so that some are wrong too.
    def constant(n: int = finetune.TASK_SIZE, seed: int = finetune.TASK_SEED):
        return [[q, {"role": "assistant", "content": "OK"}] for q, _ in real(n, seed)]

    real = finetune.make_task
    monkeypatch.setattr(finetune, "make_task", constant)
    monkeypatch.setitem(finetune.PRETRAIN, "max_steps", 3)  # the fixture's base
    w = build_workload(cadence.load_config(None, SHAPE))
    opt = torch.optim.AdamW(w.model.parameters(), lr=0.01)
    for step in range(300):
        batch = w.batch(torch.arange(step * 8, step * 8 + 8) % w.n_train)
        loss = w.loss_sum(w.model, batch) / w.units(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w.answers[::3] = ["NO"] * len(w.answers[::3])
    got = w.evaluate(w.model)["val_exact_match"]
    render, tok = jinja_renderer(DEFAULT_TEMPLATE), ByteTokenizer()
    questions = [m for split, m in finetune.split_stream(constant(), 0.1) if split == "val"]
    right = 0
    for i, messages in enumerate(questions[: w.n_val]):
        prompt = tok.encode(render(messages[:-1], True)).tolist()
        params = SamplingParams(max_new_tokens=w.max_new, temperature=0.0)
        text = tok.decode(list(generate(w.model, prompt, params)))
        right += text.startswith(w.answers[i] + "<|end|>")
    assert 0 < got < 1 and got == right / w.n_val
