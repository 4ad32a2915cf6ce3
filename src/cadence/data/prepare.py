"""`cadence prepare-data`: tokenize a corpus once into the shards of :mod:`cadence.data.shards`.

Tokenizing at the start of every run costs minutes per gigabyte and holds the corpus in memory;
a prepared corpus is tokenized once, in parallel, and then read in place by every run.

An interrupted prepare never leaves something that looks finished, and a rerun of the same
command does not redo finished shards:

* the old ``index.json`` is removed first and the new one is written last (temp + os.replace),
  so a folder with an index is always complete;
* each shard is written under a ``.tmp`` name and renamed when full; ``DIR/.progress.json``
  lists the finished shards with the settings and source fingerprints they were made from, and
  is deleted when the index is written;
* shard ``k`` of a split always holds tokens ``[k * shard_tokens, (k + 1) * shard_tokens)`` of
  that split's stream, so a rerun with the same settings and unchanged sources re-reads and
  re-tokenizes the corpus but keeps (does not rewrite) each finished shard whose recomputed
  tokens hash to its recorded SHA-256; one that does not match is rewritten. A trained BPE
  tokenizer is kept too (its hash is in the progress file), so a rerun does not retrain it.
  Other settings or changed sources start over; the piece size, sized from the sources'
  bytes when not given, is one of the settings. Input refused while reading leaves nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from cadence.data.checks import check_tokenizer, check_val_fraction
from cadence.data.errors import DataError
from cadence.data.shard_writer import ShardWriter
from cadence.data.shards import FORMAT, INDEX_FILE, VERSION, dtype_for, val_piece
from cadence.data.sources import (
    MIN_PIECE_BYTES,
    ReadStats,
    Source,
    iter_pieces,
    open_sources,
    piece_bytes,
)
from cadence.data.tokenizers import (
    PRETRAINED_FILES,
    TOKENIZER_FILE,
    BPETokenizer,
    ByteTokenizer,
    PretrainedTokenizer,
    Tokenizer,
    _chunks,
    has_pretrained_tokenizer,
    load_tokenizer,
)
from cadence.io import atomic_write_json, sha256_file

__all__ = [
    "BPE_TRAIN_BYTES",
    "PROGRESS_FILE",
    "SEPARATOR_TOKEN",
    "prepare_corpus",
    "tokenizer_spec",
]

SEPARATOR_TOKEN = "<|endoftext|>"  # the trained BPE's one special token: the piece separator
BPE_TRAIN_BYTES = 200 * 10**6  # BPE trains on (at most) the first this many training bytes
PROGRESS_FILE = ".progress.json"
SPLITS = ("train", "val")
_TASK_BYTES = 8 << 20  # text per worker task: large enough to amortise pickling, small for RAM


def prepare_corpus(
    sources: list[str | Path | Source],
    out: str | Path,
    *,
    tokenizer: str = "byte",
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    workers: int = 1,
    shard_tokens: int = 2**26,
    chunk_bytes: int | None = None,
    max_bytes: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``sources`` into the prepared corpus ``out`` and return its index.

    ``tokenizer`` is ``"byte"``, ``"bpe"`` (trained here on training pieces only, so validation
    text never shapes the vocabulary) or a Hugging Face model folder holding tokenizer.json.
    ``chunk_bytes`` is the piece size, the unit of the validation split; None sizes it from
    the sources' file sizes (:func:`cadence.data.sources.piece_bytes`), so one file splits as
    well as many. Rerunning after an interruption resumes (see the module docstring); a refusal
    (bad input found while reading) removes what this call wrote. ``max_bytes`` keeps the first
    that many bytes of text, in corpus order, for quick experiments on a large corpus.
    """
    _check_options(val_fraction, workers, shard_tokens, chunk_bytes)
    if max_bytes is not None and max_bytes < 1:
        raise DataError(f"--max-bytes: must be a positive number of bytes, got {max_bytes}")
    out = Path(out).expanduser()
    srcs = open_sources(sources, exclude=out.resolve())
    if not srcs:
        raise DataError("prepare-data: give at least one source (a file or a folder)")
    spec = tokenizer_spec(tokenizer, vocab_size)
    fingerprint = [s.fingerprint() for s in srcs]
    size = sum(f["size"] for f in fingerprint)  # from stat: known before a byte is read
    if chunk_bytes is None:
        chunk_bytes = piece_bytes(size if max_bytes is None else min(size, max_bytes))
    settings = {"format": FORMAT, "version": VERSION, "tokenizer": spec}
    settings |= {"val_fraction": val_fraction, "chunk_bytes": chunk_bytes}
    settings["shard_tokens"] = shard_tokens
    if max_bytes is not None:  # absent when unset, so earlier progress files still match
        settings["max_bytes"] = max_bytes
    created = not out.exists()
    state = _start(out, settings, fingerprint)
    with _undone_on_refusal(out, created):
        console = Console(stderr=True, quiet=not progress)
        limits = (chunk_bytes, max_bytes)
        tok, sep = _tokenizer(out, spec, state, srcs, limits, val_fraction, console)
        dtype = dtype_for(tok.vocab_size)

        def commit() -> None:
            atomic_write_json(out / PROGRESS_FILE, state)

        writers = {
            s: ShardWriter(out, s, dtype, shard_tokens, state["shards"][s], commit) for s in SPLITS
        }
        counts = {s: {"documents": 0, "pieces": 0, "bytes": 0} for s in SPLITS}
        stats = ReadStats()
        total = None if any(s.has_unsized_text for s in srcs) else size
        if (total is not None and total <= _TASK_BYTES) or spec["kind"] == "byte":
            # One task, or byte "tokenizing" (a copy): worker processes would only add the cost
            # of starting them and of pickling the text there and the tokens back.
            workers = 1
        tasks = _tasks(iter_pieces(srcs, chunk_bytes, stats, max_bytes), val_fraction, counts)
        if total is not None and max_bytes is not None:
            total = min(total, max_bytes)
        initargs = (str(out / TOKENIZER_FILE), sep, dtype.str)
        columns = (TextColumn("tokenizing"), BarColumn(bar_width=16), DownloadColumn())
        columns += (TransferSpeedColumn(), TimeElapsedColumn())
        done = 0
        with Progress(*columns, console=console, disable=not progress) as bar:
            task_id = bar.add_task("tokenize", total=total)
            for train_ids, val_ids, nbytes in _tokenize(tasks, workers, initargs):
                writers["train"].write(train_ids)
                writers["val"].write(val_ids)
                done += nbytes
                bar.update(task_id, completed=done + stats.skipped_bytes)
            bar.update(task_id, total=done, completed=done)
        splits = {}
        for s in SPLITS:
            shards = writers[s].finish()
            splits[s] = {"shards": shards, "tokens": sum(x["tokens"] for x in shards), **counts[s]}
        _check_splits(srcs, counts, val_fraction, chunk_bytes)
    index = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "separator": sep,
        "tokenizer": {
            "kind": spec["kind"],
            "vocab_size": tok.vocab_size,
            "source": spec.get("source"),
        },
        "splits": splits,
        "val_fraction": val_fraction,
        "chunk_bytes": chunk_bytes,
        "shard_tokens": shard_tokens,
        "max_bytes": max_bytes,
        "sources": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bytes": done,
        "skipped": {"files": stats.skipped_files, "documents": stats.skipped_documents},
    }
    atomic_write_json(out / INDEX_FILE, index)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return index


# ---------------------------------------------------------------- settings and the folder


def _check_options(
    val_fraction: float, workers: int, shard_tokens: int, chunk_bytes: int | None
) -> None:
    try:
        check_val_fraction(val_fraction)
    except DataError as exc:
        raise DataError(str(exc).replace("data.val_fraction", "--val-fraction")) from None
    for flag, value, least in (
        ("--workers", workers, 1),
        ("--shard-tokens", shard_tokens, 1),
        *([("--chunk-bytes", chunk_bytes, MIN_PIECE_BYTES)] if chunk_bytes is not None else []),
    ):
        if not isinstance(value, int) or value < least:
            raise DataError(f"{flag}: must be an integer >= {least}, got {value}")


def tokenizer_spec(tokenizer: str, vocab_size: int) -> dict[str, Any]:
    """What identifies the tokenizer for resuming: a changed one must start over."""
    if tokenizer == "byte":
        return {"kind": "byte"}
    if tokenizer == "bpe":
        try:
            check_tokenizer("bpe", vocab_size)
        except DataError as exc:
            raise DataError(str(exc).replace("data.vocab_size", "--vocab-size")) from None
        return {"kind": "bpe", "vocab_size": vocab_size, "train_bytes": BPE_TRAIN_BYTES}
    path = Path(tokenizer).expanduser()
    if not has_pretrained_tokenizer(path):
        raise DataError(
            f"--tokenizer {tokenizer}: is not 'byte', 'bpe' or a folder holding a tokenizer.json "
            "(a Hugging Face model folder)"
        )
    path = path.resolve()
    _load_pretrained(path)  # refused (no eos, does not load) before DIR is touched
    return {"kind": "hf", "source": str(path), "sha256": sha256_file(path / TOKENIZER_FILE)}


def _clear_shards(out: Path) -> None:
    for pattern in ("train-*.bin", "val-*.bin", "*.tmp"):
        for f in out.glob(pattern):
            f.unlink()


@contextlib.contextmanager
def _undone_on_refusal(out: Path, created: bool) -> Iterator[None]:
    """Input refused while reading it (too little text to split, a bad record): remove what
    this call wrote, and ``out`` itself if it made it. The same input would be refused again,
    so unlike an interruption there is nothing worth resuming."""
    try:
        yield
    except DataError:
        _clear_shards(out)
        for name in (PROGRESS_FILE, TOKENIZER_FILE, *PRETRAINED_FILES):
            (out / name).unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def _start(out: Path, settings: dict[str, Any], fingerprint: list[dict]) -> dict[str, Any]:
    """Claim ``out``: drop its old index, and resume its progress if made the same way."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    index, prog = out / INDEX_FILE, out / PROGRESS_FILE
    if not index.exists() and not prog.exists() and any(out.iterdir()):
        raise DataError(
            f"--out {out}: is not empty and holds no prepared corpus; choose a new or empty "
            "folder (prepare-data deletes what it wrote there before)"
        )
    index.unlink(missing_ok=True)  # from here on, a kill leaves no index that looks complete
    try:
        state = json.loads(prog.read_text(encoding="utf-8")) if prog.exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        state = None
    if (
        isinstance(state, dict)
        and state.get("settings") == settings
        and state.get("sources") == fingerprint
    ):
        return state
    _clear_shards(out)
    for name in (TOKENIZER_FILE, *PRETRAINED_FILES):
        (out / name).unlink(missing_ok=True)
    state = {"settings": settings, "sources": fingerprint, "tokenizer_sha256": None}
    state["shards"] = {s: [] for s in SPLITS}
    atomic_write_json(prog, state)
    return state


# ---------------------------------------------------------------- the tokenizer


def _tokenizer(
    out: Path,
    spec: dict[str, Any],
    state: dict[str, Any],
    srcs: list[Source],
    limits: tuple[int, int | None],
    val_fraction: float,
    console: Console,
) -> tuple[Tokenizer, int]:
    """The tokenizer, saved into ``out`` (workers load it from there), and its separator id."""
    path, kind = out / TOKENIZER_FILE, spec["kind"]
    recorded = state["tokenizer_sha256"]
    if kind == "bpe" and recorded and path.is_file() and sha256_file(path) == recorded:
        tok: Tokenizer = load_tokenizer(path)  # resuming: keep the tokenizer the shards used
    elif kind == "bpe":
        text = _bpe_text(srcs, limits, val_fraction)
        mb = len(text.encode("utf-8")) / 1e6
        with console.status(
            f"training a BPE tokenizer (vocab {spec['vocab_size']}) on {mb:.1f} MB"
        ):
            tok = BPETokenizer.train(text, spec["vocab_size"], special_tokens=[SEPARATOR_TOKEN])
        tok.save(out)
    elif kind == "byte":
        tok = ByteTokenizer()
        tok.save(out)
    else:
        tok = _load_pretrained(Path(spec["source"]))
        tok.save(out)
    sha = sha256_file(path)
    if recorded not in (None, sha):  # not the tokenizer the finished shards were made with
        _clear_shards(out)
        state["shards"] = {s: [] for s in SPLITS}
    state["tokenizer_sha256"] = sha
    atomic_write_json(out / PROGRESS_FILE, state)
    if isinstance(tok, ByteTokenizer):
        return tok, 0  # NUL: _decode_text refuses it, so it never occurs in accepted text
    if isinstance(tok, PretrainedTokenizer):
        return tok, int(tok.eos_token_id)  # type: ignore[arg-type]
    return tok, int(tok._tok.token_to_id(SEPARATOR_TOKEN))  # type: ignore[attr-defined]


def _load_pretrained(path: Path) -> PretrainedTokenizer:
    try:
        tok = PretrainedTokenizer.from_dir(path)
    except Exception as exc:  # tokenizers raises plain Exceptions for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"--tokenizer {path}: its tokenizer.json does not load ({first[:200]}); give a "
            "folder saved by a Hugging Face tokenizer"
        ) from None
    if tok.eos_token_id is None:
        raise DataError(
            f"--tokenizer {path}: has no end-of-sequence token (eos_token in "
            "tokenizer_config.json) to separate documents; use a tokenizer with one, or bpe"
        )
    return tok


def _bpe_text(srcs: list[Source], limits: tuple[int, int | None], val_fraction: float) -> str:
    """The first ~BPE_TRAIN_BYTES of training pieces, in corpus order (deterministic), within
    the corpus's ``max_bytes`` prefix (``limits`` is ``(chunk_bytes, max_bytes)``)."""
    parts, nbytes, n = [], 0, 0
    for i, (text, nb, _) in enumerate(iter_pieces(srcs, limits[0], max_bytes=limits[1])):
        n = i + 1
        if nbytes >= BPE_TRAIN_BYTES:
            break
        if not val_piece(i, val_fraction):
            parts.append(text)
            nbytes += nb
    if not parts:
        counts = {"train": {"pieces": 0}, "val": {"pieces": n}}
        _check_splits(srcs, counts, val_fraction, limits[0])
    return "".join(parts)


def _check_splits(
    srcs: list[Source], counts: dict[str, dict], val_fraction: float, chunk_bytes: int
) -> None:
    n = counts["train"]["pieces"] + counts["val"]["pieces"]
    names = ", ".join(str(s.path) for s in srcs[:3]) + (", ..." if len(srcs) > 3 else "")
    if n == 0:
        raise DataError(
            f"{names}: no text found; give UTF-8 text files, .jsonl or .parquet files with a "
            '"text" field, or a dataset saved with save_to_disk'
        )
    if n == 1:  # piece 0 always goes to validation (val_piece), whatever the fraction
        raise DataError(
            f"{names}: too little text to split into training and validation (one piece of "
            f"at most {chunk_bytes:,} bytes); give more text (a few KB), or a smaller "
            "--chunk-bytes to cut it into more pieces"
        )
    for split in SPLITS:
        if counts[split]["pieces"] == 0:
            name = "training" if split == "train" else "validation"
            raise DataError(
                f"--val-fraction {val_fraction}: leaves the {name} split empty ({n} pieces of "
                f"text in {names}); use more text or another --val-fraction"
            )


# ---------------------------------------------------------------- tokenizing


def _tasks(
    pieces: Iterable[tuple[str, int, int]], val_fraction: float, counts: dict[str, dict]
) -> Iterator[tuple[list[tuple[str, bool]], int]]:
    """Batches of ``(piece, is_val)`` in corpus order, counting pieces, text bytes and documents
    per split (a document counts in each split that holds one of its pieces)."""
    batch: list[tuple[str, bool]] = []
    nbytes, last_doc = 0, {s: -1 for s in SPLITS}
    for i, (text, nb, doc) in enumerate(pieces):
        is_val = val_piece(i, val_fraction)
        split = "val" if is_val else "train"
        counts[split]["pieces"] += 1
        counts[split]["bytes"] += nb
        if last_doc[split] != doc:
            counts[split]["documents"] += 1
            last_doc[split] = doc
        batch.append((text, is_val))
        nbytes += nb
        if nbytes >= _TASK_BYTES:
            yield batch, nbytes
            batch, nbytes = [], 0
    if batch:
        yield batch, nbytes


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_file: str, separator: int, dtype: str, pool_size: int = 0) -> None:
    """Rebuild the tokenizer from its saved file (a pickled one would not be the saved one).

    In a pool of ``pool_size`` processes each gets its share of the CPUs for the tokenizer's own
    threads (``encode_batch``), so the machine is used but not oversubscribed.
    """
    if pool_size:
        try:
            cpus = len(os.sched_getaffinity(0))  # a container's share, not the host's
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        threads = max(1, cpus // pool_size)
        os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the first batch is encoded
        if threads == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    tok = load_tokenizer(tokenizer_file)
    if isinstance(tok, BPETokenizer):
        tok._tok.encode_special_tokens = True  # type: ignore[attr-defined]  # text spelling the separator stays text
    _WORKER.update(tok=tok, sep=separator, dtype=np.dtype(dtype))


def _encode_many(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    if not isinstance(tok, BPETokenizer):
        return [tok.encode(t) for t in texts]
    # One encode_batch for the whole task: per call overhead dominates on short documents.
    owner, chunks = [], []
    for i, text in enumerate(texts):
        for c in _chunks(text):
            owner.append(i)
            chunks.append(c)
    encs = tok._tok.encode_batch(chunks, add_special_tokens=False)  # type: ignore[attr-defined]
    ids: list[list[list[int]]] = [[] for _ in texts]
    for i, enc in zip(owner, encs):
        ids[i].append(enc.ids)
    return [np.fromiter(itertools.chain.from_iterable(p), dtype=np.int64) for p in ids]


def _encode_task(task: tuple[list[tuple[str, bool]], int]) -> tuple[np.ndarray, np.ndarray, int]:
    """A batch's training and validation tokens, a separator after every piece."""
    pieces, nbytes = task
    dtype, sep = _WORKER["dtype"], np.array([_WORKER["sep"]], dtype=_WORKER["dtype"])
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for (_, is_val), ids in zip(pieces, _encode_many(_WORKER["tok"], [t for t, _ in pieces])):
        parts[is_val] += [ids.astype(dtype), sep]
    cat = [np.concatenate(parts[v]) if parts[v] else np.zeros(0, dtype) for v in (False, True)]
    return cat[0], cat[1], nbytes


def _tokenize(
    tasks: Iterable[Any], workers: int, initargs: tuple[str, int, str]
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Results in task order; at most ``2 * workers`` tasks in flight bounds the memory."""
    if workers == 1:
        _init_worker(*initargs)
        for task in tasks:
            yield _encode_task(task)
        return
    # Not a plain fork: the parent may hold threads (torch, a BPE trainer's pool). The fork
    # server is a fresh process that imports this module once; workers fork from it.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    pool = ProcessPoolExecutor(
        workers, ctx, initializer=_init_worker, initargs=(*initargs, workers)
    )
    try:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(_encode_task, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
