"""Chat and instruction JSONL: reading, rendering turn by turn, and the answer mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cadence.data import DataError
from cadence.data.chat import (
    DEFAULT_TEMPLATE,
    encode_conversations,
    jinja_renderer,
    read_conversations,
)
from cadence.data.tokenizers import ByteTokenizer
from cadence.workloads.chat import split_examples

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+3"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "and 4+4?"},
    {"role": "assistant", "content": "8"},
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_chat_and_instruction_lines_become_conversations(tmp_path):
    chat = _write(tmp_path / "c.jsonl", [json.dumps({"messages": CHAT}), ""])
    assert read_conversations(chat, "chat") == [CHAT]
    inst = _write(tmp_path / "i.jsonl", [json.dumps({"prompt": "p", "completion": "c"})])
    assert read_conversations(inst, "instruction") == [
        [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    ]


@pytest.mark.parametrize(
    "line, fmt, needle",
    [
        ("{not json", "chat", ":2: not a JSON object"),
        ('{"text": "x"}', "chat", ':2: a chat line needs "messages"'),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "chat", "role 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "chat", "no assistant turn"),
        ('{"prompt": "x"}', "instruction", ':2: an instruction needs "completion"'),
    ],
)
def test_a_bad_line_names_the_file_and_line(tmp_path, line, fmt, needle):
    good = json.dumps({"messages": CHAT} if fmt == "chat" else {"prompt": "a", "completion": "b"})
    path = _write(tmp_path / "d.jsonl", [good, line])
    with pytest.raises(DataError) as err:
        read_conversations(path, fmt)
    assert str(err.value).startswith(str(path)) and needle in str(err.value)


def test_the_mask_counts_exactly_the_answers_and_the_text_is_the_rendering():
    render = jinja_renderer(DEFAULT_TEMPLATE)
    tok = ByteTokenizer()
    full = render(CHAT, False)
    enc = encode_conversations([CHAT], tok.encode, render, window=200, loss_on="answers")
    n = len(full.encode())
    assert enc.truncated == 0
    # the ids are the rendering's bytes (byte tokenizer), padded with zeros
    assert bytes(enc.ids[0, :n].astype(np.uint8)) == full.encode()
    assert not enc.ids[0, n:].any()
    # the counted tokens are each answer plus what the template closes it with
    counted = bytes(enc.ids[0][enc.mask[0]].astype(np.uint8)).decode()
    assert counted == "5<|end|>\n8<|end|>\n"
    # what comes before each answer is what a server renders with the generation prompt
    prompt = render(CHAT[:2], True)
    assert full.startswith(prompt) and full[len(prompt) :].startswith("5<|end|>")
    everything = encode_conversations([CHAT], tok.encode, render, window=200, loss_on="all")
    assert everything.mask[0].sum() == n and (everything.ids == enc.ids).all()


def test_long_conversations_are_cut_at_the_window():
    render = jinja_renderer(DEFAULT_TEMPLATE)
    enc = encode_conversations([CHAT], ByteTokenizer().encode, render, window=20, loss_on="all")
    assert enc.truncated == 1 and enc.ids.shape == (1, 20) and enc.mask[0].all()


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # a template that puts the number of messages first changes its prefix every turn
    render = jinja_renderer(
        "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(DataError, match="chat template"):
        encode_conversations([CHAT], ByteTokenizer().encode, render, window=100, loss_on="answers")


@pytest.mark.parametrize("n, fraction", [(2, 0.05), (10, 0.2), (101, 0.05)])
def test_the_split_is_seed_free_disjoint_and_holds_every_kth(n, fraction):
    train, val = split_examples(n, fraction)
    assert np.intersect1d(train, val).size == 0 and np.union1d(train, val).size == n
    assert val.size >= 1 and train.size >= 1
    assert (split_examples(n, fraction)[1] == val).all()
