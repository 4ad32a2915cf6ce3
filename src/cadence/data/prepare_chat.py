"""`cadence prepare-data --format chat | instruction`: conversations into shards, read in place.

The JSONL files are read a line at a time, rendered with the chat template (a model folder's
own, or cadence's default for its byte and BPE tokenizers), encoded piece by piece as in a run
that reads the JSONL itself (data/chat.py), split every k-th conversation as that run splits
(chat_streams.split_stream), and written as three streams per split: the tokens, an answer flag
per token, and where each conversation starts (see data/shards.py). A run on the folder trains
on exactly what a run on the file would, without holding it in memory.

The folder's life follows text preparation's rules (data/prepare.py): the old index goes first
and the new one last, shards are renamed into place when full and recorded in the progress
file, so an interrupted prepare leaves no folder that looks finished and a rerun keeps the
finished shards whose recomputed content hashes the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn

from cadence.data.chat import (
    DEFAULT_TEMPLATE,
    TEMPLATE_FILE,
    Messages,
    Renderer,
    encode_conversation,
    hf_renderer,
    iter_conversations,
    jinja_renderer,
)
from cadence.data.chat_streams import ChatSplit, split_stream
from cadence.data.errors import DataError
from cadence.data.prepare import (
    BPE_TRAIN_BYTES,
    PROGRESS_FILE,
    SPLITS,
    _check_options,
    _clear_shards,
    _load_pretrained,
    _start,
    _undone_on_refusal,
    tokenizer_spec,
)
from cadence.data.shard_writer import ShardWriter
from cadence.data.shards import FORMAT, INDEX_FILE, VERSION, dtype_for, load_index, open_stream
from cadence.data.tokenizers import (
    TOKENIZER_FILE,
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
)
from cadence.io import atomic_write_json, atomic_write_text, sha256_file

__all__ = ["CHAT_FORMATS", "open_prepared_chat", "prepare_chat"]

CHAT_FORMATS = ("chat", "instruction")


def prepare_chat(
    sources: list[str | Path],
    out: str | Path,
    *,
    fmt: str = "chat",
    tokenizer: str = "byte",
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    shard_tokens: int = 2**26,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare the conversations of the JSONL ``sources`` (files, or folders of ``*.jsonl``)
    into ``out`` and return its index. ``tokenizer`` is as for text: byte, bpe (trained on the
    rendered training conversations) or a Hugging Face model folder, whose chat template
    renders the conversations."""
    _check_options(val_fraction, 1, shard_tokens, None)
    out = Path(out).expanduser()
    files = _jsonl_files(sources, out)
    spec = tokenizer_spec(tokenizer, vocab_size)
    fingerprint = [_fingerprint(f) for f in files]
    settings = {"format": FORMAT, "version": VERSION, "tokenizer": spec, "data_format": fmt}
    settings |= {"val_fraction": val_fraction, "shard_tokens": shard_tokens}
    created = not out.exists()
    state = _start(out, settings, fingerprint)
    for split in SPLITS:
        for stream in ("answers", "starts"):
            state["shards"].setdefault(f"{split}-{stream}", [])
    with _undone_on_refusal(out, created):
        console = Console(stderr=True, quiet=not progress)
        tok, render, template = _tokenizer(out, spec, state, files, fmt, val_fraction, console)
        dtype = dtype_for(tok.vocab_size)

        def commit() -> None:
            atomic_write_json(out / PROGRESS_FILE, state)

        def writer(name: str, kind: np.dtype) -> ShardWriter:
            return ShardWriter(out, name, kind, shard_tokens, state["shards"][name], commit)

        writers = {
            s: (
                writer(s, dtype),
                writer(f"{s}-answers", np.dtype(np.uint8)),
                writer(f"{s}-starts", np.dtype(np.uint64)),
            )
            for s in SPLITS
        }
        counts = {s: {"examples": 0, "tokens": 0, "answer_tokens": 0} for s in SPLITS}
        columns = (TextColumn("encoding conversations"), TextColumn("{task.completed:,}"))
        with Progress(*columns, TimeElapsedColumn(), console=console, disable=not progress) as bar:
            task_id = bar.add_task("encode", total=None)
            for split, messages in split_stream(_conversations(files, fmt), val_fraction):
                ids, answers = encode_conversation(messages, tok.encode, render)
                tokens, flags, starts = writers[split]
                c = counts[split]
                starts.write(np.array([c["tokens"]], dtype=np.uint64))
                tokens.write(ids)
                flags.write(answers.astype(np.uint8))
                c["examples"] += 1
                c["tokens"] += int(ids.size)
                c["answer_tokens"] += int(answers.sum())
                bar.advance(task_id)
        n = sum(c["examples"] for c in counts.values())
        names = ", ".join(str(f) for f in files[:3]) + (", ..." if len(files) > 3 else "")
        if n == 0:
            raise DataError(f"{names}: holds no conversations")
        if counts["val"]["examples"] == 0 or counts["train"]["examples"] == 0:
            raise DataError(
                f"{names}: holds {n} conversation(s); at least 2 are needed (one held out for "
                "validation)"
            )
        splits: dict[str, Any] = {}
        for s in SPLITS:
            tokens, flags, starts = writers[s]
            splits[s] = {
                "shards": tokens.finish(),
                "answers": flags.finish(),
                "starts": starts.finish(),
                **counts[s],
            }
        atomic_write_text(out / TEMPLATE_FILE, template)
    index = {
        "format": FORMAT,
        "version": VERSION,
        "data_format": fmt,
        "dtype": dtype.name,
        "separator": None,
        "tokenizer": {
            "kind": spec["kind"],
            "vocab_size": tok.vocab_size,
            "source": spec.get("source"),
        },
        "splits": splits,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "sources": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bytes": sum(f["size"] for f in fingerprint),
    }
    atomic_write_json(out / INDEX_FILE, index)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return index


def open_prepared_chat(path: Path, fmt: str) -> tuple[dict[str, ChatSplit], Tokenizer, str, int]:
    """A prepared chat folder's splits (read in place), its tokenizer, its chat template and
    how many conversations it holds. Text prepared as a corpus is refused in one line."""
    index = load_index(path)
    kind = index.get("data_format", "text")
    if kind not in CHAT_FORMATS:
        raise DataError(
            f"data.path: {path} was prepared from text, not conversations; prepare the JSONL "
            f"with `cadence prepare-data FILE.jsonl --format {fmt} --out DIR`"
        )
    template_file = path / TEMPLATE_FILE
    if not template_file.is_file():
        raise DataError(f"data.path: {template_file} is missing; prepare the data again")
    splits = {}
    try:
        for s in SPLITS:
            entry = index["splits"][s]
            tokens = open_stream(path, entry["shards"], np.dtype(index["dtype"]), False)
            answers = open_stream(path, entry["answers"], np.dtype(np.uint8), False)
            starts_stream = open_stream(path, entry["starts"], np.dtype(np.uint64), False)
            n = int(entry["examples"])
            if starts_stream.n_tokens != n or answers.n_tokens != tokens.n_tokens:
                raise ValueError(f"the {s} streams disagree in length")
            starts = np.append(starts_stream.read(0, n), tokens.n_tokens).astype(np.int64)
            starts_stream.close()
            splits[s] = ChatSplit(tokens, answers, starts)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"data.path: {path / INDEX_FILE} is malformed ({exc})") from None
    n = sum(split.n_examples for split in splits.values())
    return splits, load_tokenizer(path), template_file.read_text(encoding="utf-8"), n


# ---------------------------------------------------------------- sources and the tokenizer


def _jsonl_files(sources: list[str | Path], out: Path) -> list[Path]:
    files: list[Path] = []
    for src in sources:
        path = Path(src).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.jsonl") if out.resolve() not in p.parents)
            if not found:
                raise DataError(f"{path}: holds no .jsonl files of conversations")
            files += found
        elif path.is_file():
            if path.suffix.lower() != ".jsonl":
                raise DataError(
                    f"{path}: --format chat|instruction reads .jsonl files of conversations"
                )
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError("prepare-data: give at least one source (a .jsonl file or a folder)")
    return files


def _fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _conversations(files: list[Path], fmt: str) -> Iterator[Messages]:
    for f in files:
        yield from iter_conversations(f, fmt)


def _tokenizer(
    out: Path,
    spec: dict[str, Any],
    state: dict[str, Any],
    files: list[Path],
    fmt: str,
    val_fraction: float,
    console: Console,
) -> tuple[Tokenizer, Renderer, str]:
    """The tokenizer (saved into ``out``), the renderer and the template it goes with."""
    path, kind = out / TOKENIZER_FILE, spec["kind"]
    if kind == "hf":
        try:
            render, template = hf_renderer(Path(spec["source"]))
        except DataError as exc:
            raise DataError(str(exc).replace("model.hf:", "--tokenizer")) from None
        tok: Tokenizer = _load_pretrained(Path(spec["source"]))
    else:
        template = DEFAULT_TEMPLATE
        render = jinja_renderer(template)
        recorded = state["tokenizer_sha256"]
        if kind == "byte":
            tok = ByteTokenizer()
        elif recorded and path.is_file() and sha256_file(path) == recorded:
            tok = load_tokenizer(path)  # resuming: the tokenizer the finished shards used
        else:
            text, nbytes = [], 0
            for split, messages in split_stream(_conversations(files, fmt), val_fraction):
                if split == "train":
                    text.append(render(messages, False))
                    nbytes += len(text[-1].encode("utf-8"))
                    if nbytes >= BPE_TRAIN_BYTES:
                        break
            with console.status(f"training a BPE tokenizer (vocab {spec['vocab_size']})"):
                tok = build_tokenizer("bpe", "\n".join(text), spec["vocab_size"])
    tok.save(out)
    sha = sha256_file(path)
    if state["tokenizer_sha256"] not in (None, sha):  # not what the finished shards used
        _clear_shards(out)
        for key in state["shards"]:
            state["shards"][key] = []
    state["tokenizer_sha256"] = sha
    atomic_write_json(out / PROGRESS_FILE, state)
    return tok, render, template
