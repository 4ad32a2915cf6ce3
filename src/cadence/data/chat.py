"""Chat and instruction data: JSONL conversations, rendered with a chat template, with a mask
that says which tokens are the answers (``data.format: chat | instruction``).

A conversation is rendered the way it will be served: the text before each assistant turn is
the template's rendering of the turns so far with the generation prompt (what a chat server
renders and sends to the model), and the answer is what the template adds for that assistant
turn. Each piece is encoded on its own, so the prompt tokens the model trains on are exactly
those it will be given at serving time, and an answer's tokens are exactly the ones counted.

Templates are Jinja, as Hugging Face's are: a model folder's own ``chat_template`` is rendered
by its transformers tokenizer (``apply_chat_template``); cadence's own tokenizers (byte, BPE)
get :data:`DEFAULT_TEMPLATE`. The template is saved in the run directory so that export and
serving render conversations the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cadence.data.errors import DataError

__all__ = [
    "DEFAULT_TEMPLATE",
    "ROLES",
    "TEMPLATE_FILE",
    "EncodedChats",
    "encode_conversations",
    "hf_renderer",
    "jinja_renderer",
    "read_conversations",
]

ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "chat_template.jinja"

# cadence's template for its own tokenizers: plain-text role markers (a byte or BPE tokenizer
# has no special tokens for them), each turn on its own lines, an answer ending in <|end|>.
DEFAULT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ '<|end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

Messages = list[dict[str, str]]
# (messages, add_generation_prompt) -> text
Renderer = Callable[[Messages, bool], str]


def read_conversations(path: Path, fmt: str) -> list[Messages]:
    """Every line of a JSONL file as a conversation; a bad line is a DataError naming it.

    ``chat``: ``{"messages": [{"role": ..., "content": ...}, ...]}``; ``instruction``:
    ``{"prompt": ..., "completion": ...}``, which is the conversation user -> assistant.
    """
    out: list[Messages] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data.path: {path} cannot be read as UTF-8 text ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not a JSON object ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        out.append(_chat(record, where) if fmt == "chat" else _instruction(record, where))
    if not out:
        raise DataError(f"data.path: {path} holds no conversations")
    return out


def _instruction(record: dict[str, Any], where: str) -> Messages:
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            raise DataError(
                f'{where}: an instruction needs "{key}" as a string '
                '({"prompt": ..., "completion": ...})'
            )
    return [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["completion"]},
    ]


def _chat(record: dict[str, Any], where: str) -> Messages:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f'{where}: a chat line needs "messages": a list of {{"role", "content"}} objects'
        )
    out: Messages = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] needs a string content")
        if m.get("role") not in ROLES:
            raise DataError(
                f"{where}: messages[{i}] has role {m.get('role')!r}; use one of {', '.join(ROLES)}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    return out


def jinja_renderer(template: str) -> Renderer:
    """A Jinja chat template, rendered as transformers renders one (trimmed blocks, sandboxed)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    compiled = env.from_string(template)

    def render(messages: Messages, add_generation_prompt: bool) -> str:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt)

    return render


def hf_renderer(model_dir: Path) -> tuple[Renderer, str]:
    """A model folder's own chat template, through its transformers tokenizer; and the template.
    A folder without one is a DataError: guessing another model's format would train the model
    on prompts it will never be served."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    template = getattr(tok, "chat_template", None)
    if not isinstance(template, str) or not template.strip():
        raise DataError(
            f"model.hf: {model_dir} has no chat_template in its tokenizer files; add one "
            "(tokenizer_config.json or chat_template.jinja) or train on data.format: text"
        )

    def render(messages: Messages, add_generation_prompt: bool) -> str:
        return tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    return render, template


def _segments(messages: Messages, render: Renderer) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_answer) pieces, in order."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                "chat template: rendering a conversation turn by turn does not extend the "
                "earlier text (the template changes what it wrote for earlier turns); cadence "
                "needs a template whose output grows turn by turn"
            )
        pieces.append((prompt[len(done) :], False))
        pieces.append((full[len(prompt) :], True))
        done = full
    rest = render(messages, False)[len(done) :]
    if rest:
        pieces.append((rest, False))
    return [(t, a) for t, a in pieces if t]


@dataclass
class EncodedChats:
    """One example per row: token ids and a loss mask, padded to one window (``seq_len + 1``)."""

    ids: np.ndarray  # [N, window] int64, padding 0
    mask: np.ndarray  # [N, window] bool: this token is a target the loss counts
    truncated: int  # conversations cut at the window


def encode_conversations(
    conversations: Sequence[Messages],
    encode: Callable[[str], np.ndarray],
    render: Renderer,
    window: int,
    loss_on: str,
) -> EncodedChats:
    """Encode every conversation piece by piece; ``loss_on: answers`` counts only the answers'
    tokens, ``all`` every real token (never padding)."""
    ids = np.zeros((len(conversations), window), dtype=np.int64)
    mask = np.zeros((len(conversations), window), dtype=bool)
    truncated = 0
    for row, messages in enumerate(conversations):
        toks: list[np.ndarray] = []
        counted: list[np.ndarray] = []
        for text, is_answer in _segments(messages, render):
            t = np.asarray(encode(text), dtype=np.int64)
            toks.append(t)
            counted.append(np.full(t.size, is_answer or loss_on == "all"))
        seq = np.concatenate(toks) if toks else np.zeros(0, dtype=np.int64)
        cnt = np.concatenate(counted) if counted else np.zeros(0, dtype=bool)
        if seq.size > window:
            truncated += 1
            seq, cnt = seq[:window], cnt[:window]
        ids[row, : seq.size] = seq
        mask[row, : seq.size] = cnt
    return EncodedChats(ids=ids, mask=mask, truncated=truncated)
