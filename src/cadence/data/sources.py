"""prepare-data's sources: local files, folders, .jsonl, .parquet and saved HF datasets.

Everything is read as a stream of *documents* (a text file, a .jsonl line, a parquet row, a
dataset row), and each document is cut into *pieces* of at most ``chunk_bytes`` UTF-8 bytes at
line boundaries (:func:`cut_pieces`; ``chunk_bytes`` is sized from the corpus by
:func:`piece_bytes` unless the user chose it). Pieces are the unit of the validation split, so
their order must never change for the same sources: sources in the order given, files sorted
within a folder (``_walk``), rows in stored order. Folders skip hidden entries and files that
are not text (NUL bytes or invalid UTF-8), so a dataset folder can hold stray binaries.

The bundled corpus (:func:`default_corpus`, the ``.py`` sources of the installed sympy) is one
more source of this kind: every corpus, small or large, is read and prepared the same way.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cadence.data.errors import DataError

__all__ = [
    "DEFAULT_CORPUS_PACKAGE",
    "HF_DATASET_FILES",
    "ReadStats",
    "Source",
    "cut_pieces",
    "default_corpus",
    "iter_pieces",
    "open_sources",
    "piece_bytes",
]

# The default corpus: always installed (a dependency of torch), ~26 MB of real, varied code.
DEFAULT_CORPUS_PACKAGE = "sympy"

# A folder holding one of these was written by `datasets`' save_to_disk (a Dataset, or a
# DatasetDict whose top level holds only dataset_dict.json).
HF_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
# Text files up to this size are read whole (and checked by _decode_text in one call); larger
# ones are memory-mapped and checked block by block, so a 20 GB dump does not need 20 GB of RAM.
WHOLE_FILE_BYTES = 64 << 20
_BOM = b"\xef\xbb\xbf"

# The piece-size rule (piece_bytes). A 5 % validation share of 40 pieces is 3 of them.
PIECES_AT_LEAST = 40
PIECE_BYTES = 16 << 10  # what a corpus gets once it holds 40 of them ...
PIECES_BEFORE_GROWING = 4096  # ... until it holds this many; then pieces grow
MAX_PIECE_BYTES = 1 << 20  # ... up to this (a corpus of 4 GiB and more)
MIN_PIECE_BYTES = 16  # room for whole UTF-8 characters: the least --chunk-bytes takes
AUTO_LEAST_BYTES = 1 << 10  # prepare-data's floor: it does not know the training window


@dataclass
class Source:
    """One SRC argument, resolved: what kind it is and which files it stands for."""

    path: Path
    kind: str  # "file" | "folder" | "hf"
    files: list[Path]

    def fingerprint(self) -> dict[str, Any]:
        """Total bytes, newest mtime and file count: enough to tell that a source changed."""
        size, mtime, count = 0, 0, 0
        for f in self.files:
            try:
                st = f.stat()
            except OSError as exc:
                raise _unreadable(f, exc) from None
            size, mtime, count = size + st.st_size, max(mtime, st.st_mtime_ns), count + 1
        return {"path": str(self.path), "size": size, "mtime_ns": mtime, "files": count}

    @property
    def has_unsized_text(self) -> bool:
        """Whether its text bytes can differ much from its file bytes (compressed columns)."""
        return self.kind == "hf" or any(f.suffix.lower() == ".parquet" for f in self.files)


@dataclass
class ReadStats:
    documents: int = 0
    skipped_files: int = 0  # not text (binary, not UTF-8) inside a folder
    skipped_documents: int = 0  # records holding NUL or invalid Unicode
    skipped_bytes: int = 0  # the skipped files' size: read too, so part of the progress


def _decode_text(raw: bytes) -> str | None:
    """The file's text, or None when it does not look like text (NUL bytes or not UTF-8)."""
    if b"\x00" in raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.removeprefix("\ufeff")


def _walk(root: Path) -> list[Path]:
    """Regular files under ``root`` in sorted relative-path order, skipping hidden entries.

    `os.scandir`, pruning hidden folders instead of descending into them: `Path.rglob` with
    a `relative_to` and a `stat` per entry took 0.3-0.5 s on the default corpus (sympy, 1,500
    files), paid by every LM workload a process builds. Symlinked folders are not followed.
    """
    found: list[str] = []
    folders = [str(root)]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.is_file():
                    found.append(entry.path)
    start = len(str(root)) + 1
    found.sort(key=lambda path: path[start:].replace(os.sep, "/"))
    return [Path(path) for path in found]


def default_corpus() -> Source:
    """The installed sympy's ``.py`` files, sorted: byte-identical for a given sympy version."""
    spec = importlib.util.find_spec(DEFAULT_CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"data.path: no path given and the default corpus package "
            f"{DEFAULT_CORPUS_PACKAGE!r} is not installed; install it or set data.path"
        )
    root = Path(next(iter(spec.submodule_search_locations))).resolve()
    return Source(root, "folder", list(_python_files(root)))


@functools.lru_cache(maxsize=1)
def _python_files(root: Path) -> tuple[Path, ...]:
    """The walk of an installed package, once per process: it does not change while the process
    runs, and a process that builds many workloads (a sweep, a comparison) walked it each time.
    A change between processes still shows in the data cache's fingerprint (sizes, mtimes)."""
    return tuple(f for f in _walk(root) if f.suffix == ".py")


def open_sources(
    sources: Iterable[str | Path | Source], exclude: Path | None = None
) -> list[Source]:
    """Resolve SRC arguments (a ``Source`` passes as it is); ``exclude`` (the output folder) is
    left out of folder walks so preparing ``.`` into ``./prepared`` does not read its own
    shards on a rerun."""
    out: list[Source] = []
    for src in sources:
        if isinstance(src, Source):
            out.append(src)
            continue
        p = Path(src).expanduser()
        if not p.exists():
            raise DataError(
                f"{src}: does not exist; give a text file, a folder, a .jsonl or .parquet file "
                "or a dataset saved with save_to_disk"
            )
        p = p.resolve()
        if p.is_dir() and any((p / name).is_file() for name in HF_DATASET_FILES):
            out.append(Source(p, "hf", _walk(p)))
        elif p.is_dir():
            files = _walk(p)
            if exclude is not None:
                files = [f for f in files if not f.is_relative_to(exclude)]
            out.append(Source(p, "folder", files))
        else:
            out.append(Source(p, "file", [p]))
    return out


def piece_bytes(total_bytes: int, least: int = AUTO_LEAST_BYTES) -> int:
    """The piece size for a corpus of ``total_bytes`` (its files' sizes, known before reading).

    One rule for ``cadence prepare-data`` and the data cache, so a file prepared either way
    splits the same way; only sizes enter, so the split is the same on every machine and seed.

    Validation is a share of the pieces, so a corpus must be cut into enough of them: at least
    40, so that a 5 % share is 3 pieces from 3 places (a one-file corpus used to be a single
    1 MiB piece, which left a split empty). Long pieces make a better held-out test (less of
    their document is in training), so the size is total/40 up to 16 KiB (thousands of tokens,
    longer than a training window; reached at 640 KiB of text). Past 64 MiB, 4,096 such pieces
    (some 200 for validation at 5 %, beyond which more pieces barely steady the validation
    loss), pieces grow instead, up to 1 MiB from 4 GiB on, where most documents are held out
    whole.

    ``least`` (honoured up to 16 KiB) keeps a small corpus's pieces from being fragments: the
    cache passes the training window, so a validation piece holds one; prepare-data, which does
    not know the window, uses 1 KiB (a dozen lines; a byte-level window of ``seq_len`` 1023).
    A corpus under 40 of those gets fewer pieces; validation still gets one, as piece 0 always
    goes to it.
    """
    small = min(PIECE_BYTES, max(total_bytes // PIECES_AT_LEAST, least))
    size = min(MAX_PIECE_BYTES, max(small, total_bytes // PIECES_BEFORE_GROWING))
    return max(MIN_PIECE_BYTES, size)


def cut_pieces(buf: Any, chunk_bytes: int, start: int = 0) -> Iterator[tuple[int, int]]:
    """``(begin, end)`` byte ranges of ``buf[start:]`` (bytes or mmap) of at most ``chunk_bytes``.

    Each piece is the longest run of whole lines that fits; a line longer than ``chunk_bytes``
    is cut at ``chunk_bytes``, moved back to a UTF-8 character boundary so every piece decodes.
    """
    n, a = len(buf), start
    while a < n:
        b = a + chunk_bytes
        if b >= n:
            yield a, n
            return
        j = buf.rfind(b"\n", a, b)
        if j != -1:
            b = j + 1
        else:
            while b > a + 1 and (buf[b] & 0xC0) == 0x80:  # a continuation byte
                b -= 1
        yield a, b
        a = b


def _unreadable(path: Path, exc: OSError) -> DataError:
    return DataError(
        f"{path}: cannot read it ({exc.strerror or exc}); fix its permissions or leave it out "
        "of the sources"
    )


def _text_file(path: Path, in_folder: bool, stats: ReadStats) -> Iterator[tuple[Any, int]]:
    """A text file as one document: ``(buffer, start)``, ``start`` past a byte-order mark."""
    try:
        big = path.stat().st_size > WHOLE_FILE_BYTES
        fh = path.open("rb")
        raw: Any = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if big else fh.read()
        size = len(raw)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    with fh:
        try:
            if big:  # valid iff every block is: concatenated valid UTF-8 is valid UTF-8
                ok = all(_decode_text(raw[a:b]) is not None for a, b in cut_pieces(raw, 1 << 24))
            else:
                ok = _decode_text(raw) is not None
            start = 3 if raw[:3] == _BOM else 0
            if ok and len(raw) > start:
                stats.documents += 1
                yield raw, start
        finally:
            if big:
                raw.close()
    if not ok:
        if not in_folder:
            raise DataError(
                f"{path}: is not a UTF-8 text file (NUL bytes or invalid UTF-8); give text, "
                ".jsonl, .parquet or a folder of text files"
            )
        stats.skipped_files += 1
        stats.skipped_bytes += size


def _record(text: Any, where: str, stats: ReadStats) -> Iterator[tuple[Any, int]]:
    """A record's text as UTF-8; empty ones are dropped, ones holding NUL (the byte tokenizer's
    separator) or lone surrogates are skipped like a folder's non-text files."""
    if text is None or text == "":
        return
    if not isinstance(text, str):
        raise DataError(f'{where}: "text" is a {type(text).__name__}, not a string')
    if "\x00" in text:
        stats.skipped_documents += 1
        return
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        stats.skipped_documents += 1
        return
    stats.documents += 1
    yield raw, 0


def _jsonl(path: Path, stats: ReadStats) -> Iterator[tuple[Any, int]]:
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise _unreadable(path, exc) from None
    with fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                msg = getattr(exc, "msg", "not UTF-8")
                raise DataError(
                    f"{path}:{lineno} is not valid JSON ({msg}); a .jsonl file needs one JSON "
                    'object like {"text": "..."} per line'
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(
                    f'{path}:{lineno} has no string "text" field; each line of a .jsonl file '
                    'must be an object like {"text": "..."}'
                )
            yield from _record(record["text"], f"{path}:{lineno}", stats)


def _parquet(path: Path, stats: ReadStats) -> Iterator[tuple[Any, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading .parquet files needs pyarrow; pip install pyarrow"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    except Exception as exc:  # pyarrow's ArrowInvalid: not a parquet file
        raise DataError(f"{path}: is not a readable parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise DataError(f'{path}: has no "text" column (columns: {", ".join(names)})')
    for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
        for value in batch.column(0).to_pylist():
            yield from _record(value, str(path), stats)


def _hf_dataset(path: Path, stats: ReadStats) -> Iterator[tuple[Any, int]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path}: is a Hugging Face dataset saved with save_to_disk; reading it needs the "
            "datasets package: pip install datasets"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot load it with datasets.load_from_disk ({first})") from None
    parts = [ds[k] for k in ds] if isinstance(ds, datasets.DatasetDict) else [ds]
    for part in parts:
        if "text" not in part.column_names:
            raise DataError(
                f'{path}: the dataset has no "text" column (columns: '
                f"{', '.join(part.column_names)})"
            )
        for batch in part.select_columns(["text"]).iter(batch_size=1024):
            for value in batch["text"]:
                yield from _record(value, str(path), stats)


def _documents(source: Source, stats: ReadStats) -> Iterator[tuple[Any, int]]:
    if source.kind == "hf":
        yield from _hf_dataset(source.path, stats)
        return
    for f in source.files:
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl(f, stats)
        elif suffix == ".parquet":
            yield from _parquet(f, stats)
        else:
            yield from _text_file(f, source.kind == "folder", stats)


def iter_pieces(
    sources: list[Source],
    chunk_bytes: int,
    stats: ReadStats | None = None,
    max_bytes: int | None = None,
) -> Iterator[tuple[str, int, int]]:
    """Every piece in corpus order: ``(text, utf8_bytes, document_number)``; with ``max_bytes``,
    the deterministic prefix of that many bytes (the last piece cut at a character boundary)."""
    stats = stats if stats is not None else ReadStats()
    left = max_bytes
    for source in sources:
        for buf, start in _documents(source, stats):
            doc = stats.documents - 1
            for a, b in cut_pieces(buf, chunk_bytes, start):
                raw = bytes(buf[a:b])
                if left is not None and len(raw) >= left:
                    text = raw[:left].decode("utf-8", errors="ignore")
                    if text:
                        yield text, len(text.encode("utf-8")), doc
                    return
                if left is not None:
                    left -= len(raw)
                yield raw.decode("utf-8"), b - a, doc
