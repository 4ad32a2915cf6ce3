"""Prepared corpora: token shards on disk, their index, and reading windows of them in place.

``cadence prepare-data SRC... --out DIR`` (:mod:`cadence.data.prepare`) tokenizes once and
writes DIR as:

    DIR/index.json          the manifest, written last (atomically): a DIR without it, or whose
                            index does not verify, is not a prepared corpus
    DIR/tokenizer.json      the tokenizer (+ tokenizer_config.json for an HF model's)
    DIR/train-00000.bin     raw little-endian token ids (uint16 when the vocabulary fits,
    DIR/val-00000.bin       uint32 otherwise), documents joined by the separator token

Conversations (``--format chat | instruction``, :mod:`cadence.data.prepare_chat`) add two
streams per split, ``train-answers-*.bin`` (uint8: 1 where a token is part of an answer) and
``train-starts-*.bin`` (uint64: where each conversation starts), and the chat template; the
index says ``"data_format": "chat"``, and the text readers refuse such a folder.

Each split is one token stream cut into shards of at most ``shard_tokens`` tokens; a training
window may span two shards. The index records, per split, the shards (file, tokens, SHA-256)
and totals, and, for the corpus, the tokenizer, the separator id, the dtype, the validation rule
and the sources' fingerprints (path, size, mtime) so a stale preparation can be recognised.

Validation is split off by piece: each document is cut at line boundaries into pieces of at
most ``chunk_bytes`` (sized from the sources' bytes by :func:`cadence.data.sources.piece_bytes`
unless the user chose it; recorded in the index, which readers never need: the streams are
split already), and piece ``i`` of the corpus, in source order, is validation when
``frac(i * 2654435761 / 2**32) < val_fraction`` (Fibonacci hashing: a low-discrepancy
sequence, so validation is spread evenly through the corpus rather than being its last files), a
fixed rule that ignores every seed; no training window ever reads validation text.

Reading (:func:`open_prepared`) checks the index and every shard's size, and with
``verify=True`` their checksums; a missing, truncated or corrupt file is a ``DataError`` naming
it. Windows are read in place with ``pread`` (see :class:`TokenStream`): resident memory holds
the batch being read, not the corpus.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cadence.data.errors import DataError
from cadence.io import sha256_file

__all__ = [
    "FORMAT",
    "INDEX_FILE",
    "VERSION",
    "PreparedCorpus",
    "TokenStream",
    "dtype_for",
    "is_prepared",
    "load_index",
    "open_stream",
    "open_prepared",
    "val_piece",
]

FORMAT = "cadence-tokens"
VERSION = 1
INDEX_FILE = "index.json"
HASH_MULT = 2654435761


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def val_piece(i: int, val_fraction: float) -> bool:
    """Whether corpus piece ``i`` (in source order) belongs to validation."""
    return ((i * HASH_MULT) & 0xFFFFFFFF) / 2.0**32 < val_fraction


def is_prepared(path: str | Path) -> bool:
    """A folder that `cadence prepare-data` finished (it has an index)."""
    p = Path(path)
    return p.is_dir() and (p / INDEX_FILE).is_file()


class TokenStream:
    """One split's shards as a single token stream: ``read(offset, length)`` spans shards.

    Reads are ``os.pread`` calls into a fresh buffer, not a memory map, so resident memory is
    the batch being read and nothing else. Measured with ``np.memmap``: 30 batches of random
    windows from a 1 GB corpus took resident memory from 0.24 to 1.4 GB, ``MADV_RANDOM`` or
    not, because a page fault maps a whole cached folio of the file (up to megabytes) into the
    process; those pages are reclaimable page cache, but they are counted as the process's and
    grow with the corpus. A syscall per window costs microseconds, far below a training step
    (see benchmarks/data.py).
    """

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype) -> None:
        self.paths = paths
        self.dtype = np.dtype(dtype)
        self.counts = counts
        self.starts = np.cumsum([0, *counts])
        self.n_tokens = int(self.starts[-1])
        self._fds: list[int] | None = None

    def _open(self) -> list[int]:
        if self._fds is None:
            self._fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        return self._fds

    def read(self, offset: int, length: int) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` as int64."""
        if offset < 0 or offset + length > self.n_tokens:
            raise IndexError(f"tokens [{offset}, {offset + length}) of {self.n_tokens}")
        fds, size = self._open(), self.dtype.itemsize
        parts = []
        shard = int(np.searchsorted(self.starts, offset, side="right")) - 1
        filled = 0
        while filled < length:
            lo = offset + filled - int(self.starts[shard])
            take = min(length - filled, self.counts[shard] - lo)
            raw = os.pread(fds[shard], take * size, lo * size)
            if len(raw) != take * size:
                raise DataError(f"data.path: {self.paths[shard]} is shorter than its index says")
            parts.append(np.frombuffer(raw, dtype=self.dtype))
            filled += take
            shard += 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def close(self, _close: Callable[[int], None] = os.close) -> None:
        # os.close bound at definition: at interpreter exit __del__ may run after the os
        # module's globals are cleared
        for fd in self._fds or []:
            _close(fd)
        self._fds = None

    def __del__(self) -> None:
        self.close()


@dataclass
class PreparedCorpus:
    path: Path
    index: dict[str, Any]
    train: TokenStream
    val: TokenStream

    @property
    def vocab_size(self) -> int:
        return int(self.index["tokenizer"]["vocab_size"])

    @property
    def separator(self) -> int:
        return int(self.index["separator"])


def load_index(root: Path) -> dict[str, Any]:
    path = root / INDEX_FILE
    if not path.is_file():
        raise DataError(
            f"data.path: {root} has no {INDEX_FILE}; prepare it with `cadence prepare-data "
            f"SRC --out {root}` (an interrupted prepare leaves no index)"
        )
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(
            f"data.path: {path} is corrupt (not JSON); prepare the data again"
        ) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"data.path: {path} is not a cadence prepared-data index")
    if index.get("version") != VERSION:
        raise DataError(
            f"data.path: {path} has format version {index.get('version')}, this cadence reads "
            f"{VERSION}; prepare the data again"
        )
    return index


def open_stream(root: Path, shards: list[dict], dtype: np.dtype, verify: bool) -> TokenStream:
    """The shards listed in an index (file, tokens, sha256) as one stream: each sized (and
    hashed if ``verify``) against the index."""
    dtype = np.dtype(dtype)
    paths, counts = [], []
    for shard in shards:
        path = root / shard["file"]
        if not path.is_file():
            raise DataError(f"data.path: shard {path} is missing; prepare the data again")
        expected = int(shard["tokens"]) * dtype.itemsize
        if path.stat().st_size != expected:
            raise DataError(
                f"data.path: shard {path} has {path.stat().st_size} bytes, the index says "
                f"{expected} (truncated or replaced); prepare the data again"
            )
        if verify and sha256_file(path) != shard["sha256"]:
            raise DataError(
                f"data.path: shard {path} does not match its checksum in {INDEX_FILE} "
                "(corrupt); prepare the data again"
            )
        if expected:
            paths.append(path)
            counts.append(int(shard["tokens"]))
    return TokenStream(paths, counts, dtype)


def _open_split(root: Path, index: dict[str, Any], split: str, verify: bool) -> TokenStream:
    return open_stream(root, index["splits"][split]["shards"], np.dtype(index["dtype"]), verify)


def open_prepared(path: str | Path, verify: bool = False) -> PreparedCorpus:
    """The prepared corpus at ``path``: index checked, shards sized (and hashed if ``verify``)."""
    root = Path(path).expanduser()
    index = load_index(root)
    fmt = index.get("data_format", "text")
    if fmt != "text":
        raise DataError(
            f"data.path: {root} holds conversations (prepared with --format {fmt}); train on "
            f"it with data.format: {fmt}"
        )
    try:
        train = _open_split(root, index, "train", verify)
        val = _open_split(root, index, "val", verify)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"data.path: {root / INDEX_FILE} is malformed ({exc})") from None
    return PreparedCorpus(root, index, train, val)
