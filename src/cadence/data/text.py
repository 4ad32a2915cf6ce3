"""Text corpora for the language-model workload, and the train/validation split.

The default corpus is the Python source of the installed ``sympy`` package: it is
always present (a dependency of torch), about 25 MB of real, varied text, and needs
no network. Users point ``data.path`` at their own file or folder instead.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from cadence.data.checks import check_max_bytes, check_text_path, check_val_fraction
from cadence.data.errors import DataError

__all__ = ["DEFAULT_CORPUS_PACKAGE", "load_text", "split_blocks"]

DEFAULT_CORPUS_PACKAGE = "sympy"
# Fibonacci-hashing multiplier: frac(i * 2654435761 / 2**32) ~ frac(i * 0.618...),
# a low-discrepancy sequence, so validation blocks are evenly spread through the corpus.
_HASH_MULT = 2654435761


class _Reader:
    """Accumulates text pieces and stops once ``max_bytes`` UTF-8 bytes are collected."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.pieces: list[str] = []
        self.nbytes = 0

    @property
    def full(self) -> bool:
        return self.max_bytes is not None and self.nbytes >= self.max_bytes

    def add(self, piece: str, nbytes: int | None = None) -> None:
        self.pieces.append(piece)
        self.nbytes += len(piece.encode("utf-8")) if nbytes is None else nbytes

    def text(self) -> str:
        out = "".join(self.pieces)
        if self.max_bytes is not None and self.nbytes > self.max_bytes:
            # Cut at the byte limit; drop a multi-byte character split by the cut.
            out = out.encode("utf-8")[: self.max_bytes].decode("utf-8", errors="ignore")
        return out


def _decode_text(raw: bytes) -> str | None:
    """The file's text, or None when it does not look like text (NUL bytes or not UTF-8)."""
    if b"\x00" in raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.removeprefix("\ufeff")


def _read_jsonl(path: Path) -> str:
    """Concatenate the "text" fields of a JSON-lines file (a local Hugging Face export)."""
    docs: list[str] = []
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"data.path: {path}:{lineno} is not valid JSON ({exc.msg}); "
                    "a .jsonl file needs one JSON object per line"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(
                    f'data.path: {path}:{lineno} has no string "text" field; '
                    'each line of a .jsonl file must be an object like {"text": "..."}'
                )
            docs.append(record["text"])
    return "\n\n".join(docs)


def _read_file(path: Path) -> tuple[str, int] | None:
    """(text, utf-8 byte count) of a readable text or .jsonl file, else None."""
    if path.suffix.lower() == ".jsonl":
        try:
            text = _read_jsonl(path)
        except UnicodeDecodeError:
            return None
        return text, len(text.encode("utf-8"))
    raw = path.read_bytes()
    text = _decode_text(raw)
    if text is None:
        return None
    return text, len(raw)


def _walk(root: Path) -> list[Path]:
    """Regular files under ``root`` in sorted relative-path order, skipping hidden entries."""
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file():
            files.append(p)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files


def _default_corpus(max_bytes: int | None) -> str:
    spec = importlib.util.find_spec(DEFAULT_CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"data.path: no path given and the default corpus package "
            f"{DEFAULT_CORPUS_PACKAGE!r} is not installed; install it or set data.path"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    reader = _Reader(max_bytes)
    for path in _walk(root):
        if reader.full:
            break
        if path.suffix != ".py":
            continue
        raw = path.read_bytes()
        text = _decode_text(raw)
        if text is None:
            continue
        rel = path.relative_to(root.parent).as_posix()
        header = f"# ===== file: {rel} =====\n"
        reader.add(header)
        reader.add(text if text.endswith("\n") else text + "\n")
    return reader.text()


def load_text(path: str | None, max_bytes: int | None = None) -> str:
    """Load a training corpus as one string.

    ``path=None`` gives the default corpus (sympy's ``.py`` sources, sorted, each file
    preceded by a header line). A file is read as UTF-8 text, or as JSON lines with a
    ``"text"`` field when it ends in ``.jsonl``. A folder is read recursively in
    sorted order, skipping hidden entries and files that are not text (NUL bytes or
    invalid UTF-8), so a dataset folder can contain stray binaries. ``max_bytes``
    keeps a deterministic prefix of that many UTF-8 bytes, for quick runs.
    """
    check_max_bytes(max_bytes)
    if path is None:
        text = _default_corpus(max_bytes)
        if not text:
            raise DataError("data.path: the default corpus is empty; set data.path to a text file")
        return text

    p = check_text_path(path)
    reader = _Reader(max_bytes)
    if p.is_file():
        got = _read_file(p)
        if got is None or not got[0]:
            raise DataError(
                f"data.path: {path} is not a UTF-8 text file (or is empty); "
                "point it at a text file, a .jsonl file or a folder of text files"
            )
        reader.add(*got)
        return reader.text()

    for f in _walk(p):
        if reader.full:
            break
        got = _read_file(f)
        if got is None or not got[0]:
            continue
        text, nbytes = got
        if reader.pieces:
            reader.add("\n\n", 2)
        reader.add(text, nbytes)
    if not reader.pieces:
        raise DataError(
            f"data.path: folder {path} contains no readable UTF-8 text files; "
            "add .txt/.md/.py/.jsonl files or point data.path elsewhere"
        )
    return reader.text()


def split_blocks(
    tokens: np.ndarray, block_len: int, val_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pack a token stream into blocks of ``block_len`` and split them train/validation.

    ``block_len`` is ``seq_len + 1``: inputs plus the targets shifted by one. Block
    ``i`` goes to validation when ``frac(i * 2654435761 / 2**32) < val_fraction``,
    a fixed rule that ignores every seed, so all runs on a corpus are evaluated on
    the same blocks, and validation is spread through the corpus rather than being
    its tail (a corpus of sorted files would otherwise validate on one topic).
    The trailing partial block is dropped.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(
            f"data: expected a 1-D integer token array, got shape {tokens.shape} "
            f"dtype {tokens.dtype}"
        )
    if block_len < 2:
        raise DataError(f"model.seq_len: block length must be >= 2, got {block_len}")
    check_val_fraction(val_fraction)
    n_blocks = tokens.shape[0] // block_len
    blocks = tokens[: n_blocks * block_len].reshape(n_blocks, block_len)
    idx = np.arange(n_blocks, dtype=np.uint64)
    hashed = (idx * np.uint64(_HASH_MULT)) & np.uint64(0xFFFFFFFF)
    is_val = hashed.astype(np.float64) / 2.0**32 < val_fraction
    train, val = blocks[~is_val], blocks[is_val]
    if train.shape[0] == 0 or val.shape[0] == 0:
        raise DataError(
            f"data.path: the corpus has {tokens.shape[0]} tokens, i.e. {n_blocks} blocks of "
            f"{block_len}, giving {train.shape[0]} train and {val.shape[0]} validation blocks; "
            "use more text, a smaller model.seq_len or a different data.val_fraction"
        )
    return train, val
