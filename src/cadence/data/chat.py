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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cadence.data.errors import DataError

__all__ = [
    "DEFAULT_TEMPLATE",
    "ROLES",
    "TEMPLATE_FILE",
    "answer_end",
    "encode_conversation",
    "encode_prompt",
    "hf_renderer",
    "iter_conversations",
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
    out = list(iter_conversations(path, fmt))
    if not out:
        raise DataError(f"data.path: {path} holds no conversations")
    return out


def iter_conversations(path: Path, fmt: str) -> Iterator[Messages]:
    """The conversations of a JSONL file one by one, read a line at a time (a file larger than
    memory streams); a bad line is a DataError naming the file and the line."""
    try:
        fh = path.open(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"data.path: {path} cannot be read ({exc.strerror})") from None
    with fh:
        number = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number + 1}: not UTF-8 text ({exc.reason})") from None
            if not line:
                return
            number += 1
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not a JSON object ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield _chat(record, where) if fmt == "chat" else _instruction(record, where)


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


def jinja_renderer(template: str, **context: Any) -> Renderer:
    """A Jinja chat template, rendered as transformers renders one (trimmed blocks, sandboxed),
    with ``context`` (``bos_token``, ``eos_token``, ...) and ``raise_exception`` in scope, which
    Hugging Face templates use."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)

    def render(messages: Messages, add_generation_prompt: bool) -> str:
        return compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **context
        )

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


def _turns(messages: Messages, render: Renderer) -> tuple[list[tuple[str, bool]], str]:
    """The rendered text up to the end of the last assistant turn as (text, is_answer) pieces,
    and that text: before each answer, what the template renders with the generation prompt."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(_NOT_GROWING)
        pieces.append((prompt[len(done) :], False))
        pieces.append((full[len(prompt) :], True))
        done = full
    return pieces, done


_NOT_GROWING = (
    "chat template: rendering a conversation turn by turn does not extend the earlier text (the "
    "template changes what it wrote for earlier turns); cadence needs a template whose output "
    "grows turn by turn"
)


def _segments(messages: Messages, render: Renderer) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_answer) pieces, in order."""
    pieces, done = _turns(messages, render)
    rest = render(messages, False)[len(done) :]
    if rest:
        pieces.append((rest, False))
    return [(t, a) for t, a in pieces if t]


def encode_prompt(
    messages: Messages, encode: Callable[[str], np.ndarray], render: Renderer
) -> np.ndarray:
    """The prompt a server sends for the next answer, encoded piece by piece exactly as
    training encoded the same conversation: earlier turns, then the generation prompt."""
    pieces, done = _turns(messages, render)
    final = render(messages, True)
    if not final.startswith(done):
        raise DataError(_NOT_GROWING)
    texts = [t for t, _ in pieces] + [final[len(done) :]]
    parts = [np.asarray(encode(t), dtype=np.int64) for t in texts if t]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def answer_end(render: Renderer) -> str:
    """What the template writes after an answer's content (``<|end|>`` for cadence's default),
    stripped of whitespace: a chat server stops generating there. Empty when the template
    writes nothing there but whitespace (a model that ends answers with its EOS token)."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\x00"}]
    full = render(probe, False)
    return full[full.index("\x00") + 1 :].strip() if "\x00" in full else ""


def encode_conversation(
    messages: Messages, encode: Callable[[str], np.ndarray], render: Renderer
) -> tuple[np.ndarray, np.ndarray]:
    """A conversation's token ids (int64) and which of them are answers (bool), piece by piece,
    so the prompt tokens are exactly those a server sends and the answers those counted."""
    toks: list[np.ndarray] = []
    answers: list[np.ndarray] = []
    for text, is_answer in _segments(messages, render):
        t = np.asarray(encode(text), dtype=np.int64)
        toks.append(t)
        answers.append(np.full(t.size, is_answer))
    if not toks:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    return np.concatenate(toks), np.concatenate(answers)
