"""Chat and instruction JSONL: reading, rendering turn by turn, and the answer mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cadence.data import DataError
from cadence.data.chat import (
    DEFAULT_TEMPLATE,
    encode_conversation,
    jinja_renderer,
    read_conversations,
)
from cadence.data.chat_streams import pack_examples, split_stream
from cadence.data.tokenizers import ByteTokenizer

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
    full = render(CHAT, False)
    ids, answers = encode_conversation(CHAT, ByteTokenizer().encode, render)
    # the ids are the rendering's bytes (byte tokenizer)
    assert bytes(ids.astype(np.uint8)) == full.encode()
    # the counted tokens are each answer plus what the template closes it with
    assert bytes(ids[answers].astype(np.uint8)).decode() == "5<|end|>\n8<|end|>\n"
    # what comes before each answer is what a server renders with the generation prompt
    prompt = render(CHAT[:2], True)
    assert full.startswith(prompt) and full[len(prompt) :].startswith("5<|end|>")


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # a template that puts the number of messages first changes its prefix every turn
    render = jinja_renderer(
        "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(DataError, match="chat template"):
        encode_conversation(CHAT, ByteTokenizer().encode, render)


@pytest.mark.parametrize("n, fraction", [(1, 0.5), (2, 0.05), (10, 0.2), (101, 0.05), (7, 0.0)])
def test_the_split_is_seed_free_disjoint_and_holds_every_kth(n, fraction):
    pairs = list(split_stream(range(n), fraction))
    assert [i for _, i in pairs if _ == "train"] == sorted(i for s, i in pairs if s == "train")
    train = [i for s, i in pairs if s == "train"]
    val = [i for s, i in pairs if s == "val"]
    assert sorted(train + val) == list(range(n))
    every = round(1 / fraction) if fraction else 0
    if n >= 2 and every and n >= every:
        assert val == [i for i in range(n) if (i + 1) % max(2, every) == 0]
    elif n >= 2:  # fewer than k lines (or no fraction): the last one is held out
        assert val == [n - 1] and train
    else:
        assert val == [] and train == [0]


@pytest.mark.parametrize("window", [8, 30, 64])
def test_packing_keeps_examples_whole_in_order_and_within_the_window(window):
    lengths = np.array([5, 9, 3, 40, 2, 2, 7, 30, 1])
    bounds = pack_examples(lengths, window)
    assert bounds[0] == 0 and bounds[-1] == len(lengths) and (np.diff(bounds) >= 1).all()
    for a, b in zip(bounds[:-1], bounds[1:]):
        cut = np.minimum(lengths[a:b], window)
        assert b - a == 1 or cut.sum() <= window  # alone, or fits
        if b < len(lengths):  # next-fit: the next example did not fit
            assert cut.sum() + min(lengths[b], window) > window
