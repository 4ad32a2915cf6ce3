"""The prepared-corpus cache: one data path for small corpora and large ones.

``data.path`` naming text (a file, a folder, .jsonl, .parquet, a saved HF dataset) or nothing
(the bundled sympy corpus) is prepared by :func:`cadence.data.prepare.prepare_corpus` into a
cache folder on first use and read from there like any ``cadence prepare-data`` output, so every
run trains through one reader (:mod:`cadence.data.shards`), and later runs, resumed runs and
compare workers reuse the tokens instead of reading and tokenizing the text again.

The cache lives in ``$CADENCE_CACHE``, else ``$XDG_CACHE_HOME/cadence``, else
``~/.cache/cadence``; a corpus goes to ``data/<key>`` where the key hashes everything the tokens
depend on (the sources' fingerprints -- path, size, newest mtime, file count --, the tokenizer,
the validation rule, the piece size and the byte limit), so an edited source or another setting
prepares anew instead of reading stale tokens. Deleting the folder is always safe.

Several processes may ask for the same corpus at once (compare workers, the ranks of a
distributed run): an exclusive ``flock`` on ``data/<key>.lock`` lets one prepare while the others
wait, then find it prepared. A prepare killed half-way leaves no index (prepare's own rule), so
the next run resumes it rather than trusting it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from cadence.data.errors import DataError
from cadence.data.shards import FORMAT, VERSION, is_prepared
from cadence.data.sources import Source, piece_bytes

__all__ = ["CACHE_ENV", "cache_folder", "cache_root", "cached_corpus"]

CACHE_ENV = "CADENCE_CACHE"


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cadence"


# Prepare's option names, as the config spells them (prepare's errors name its CLI flags).
_KEYS = {
    "--val-fraction": "data.val_fraction",
    "--vocab-size": "data.vocab_size",
    "--tokenizer": "model.hf",
}


def cached_corpus(
    sources: list[Source],
    *,
    tokenizer: str,
    vocab_size: int,
    val_fraction: float,
    max_bytes: int | None,
    window: int,
) -> Path:
    """The prepared folder for ``sources`` with these settings, preparing it on first use."""
    from cadence.data.prepare import prepare_corpus, tokenizer_spec

    fingerprints = [s.fingerprint() for s in sources]  # a stat of every file: taken once
    total = sum(f["size"] for f in fingerprints)
    if max_bytes is not None:
        total = min(total, max_bytes)
    chunk = piece_bytes(total, least=window)  # prepare-data's rule, floored at one window
    with _config_names():
        spec = tokenizer_spec(tokenizer, vocab_size)
    what = {"format": FORMAT, "version": VERSION, "tokenizer": spec, "chunk_bytes": chunk}
    what |= {"val_fraction": val_fraction, "max_bytes": max_bytes}
    what["sources"] = fingerprints
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]
    root = cache_root() / "data"
    out = root / key
    if is_prepared(out):
        return out
    _cache_dir(root)
    with _locked(root / f"{key}.lock"):
        if is_prepared(out):  # another process prepared it while this one waited
            return out
        names = ", ".join(str(s.path) for s in sources)
        print(f"cadence: preparing {names} once into {out}", file=sys.stderr, flush=True)
        with _config_names():
            prepare_corpus(
                sources,
                out,
                tokenizer=tokenizer,
                vocab_size=vocab_size,
                val_fraction=val_fraction,
                chunk_bytes=chunk,
                max_bytes=max_bytes,
                progress=sys.stderr.isatty(),
            )
    return out


def _cache_dir(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"{CACHE_ENV}: cannot create the data cache {root} ({exc.strerror}); set "
            f"{CACHE_ENV} to a writable folder"
        ) from None


def cache_folder(kind: str, key: str, make: Callable[[Path], None], what: str) -> Path:
    """``<cache>/<kind>/<key>``, made on first use by ``make(folder)``.

    ``make`` writes into a temporary folder that is renamed into place only when it returns, so
    a generation killed half-way leaves nothing that a later run would trust; concurrent first
    uses (compare workers, distributed ranks) make it once, under the same lock as corpora.
    """
    root = cache_root() / kind
    out = root / key
    if out.is_dir():
        return out
    _cache_dir(root)
    with _locked(root / f"{key}.lock"):
        if out.is_dir():
            return out
        print(f"cadence: {what} once into {out}", file=sys.stderr, flush=True)
        tmp = root / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            make(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, out)
    return out


@contextlib.contextmanager
def _config_names() -> Iterator[None]:
    """Prepare's errors with the config's names for what they are about."""
    try:
        yield
    except DataError as exc:
        msg = str(exc)
        for flag, key in _KEYS.items():
            msg = msg.replace(flag, key)
        raise DataError(
            msg if msg.startswith(("data.", "model.")) else f"data.path: {msg}"
        ) from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held for the block (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent first runs would each prepare
        yield
        return
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
