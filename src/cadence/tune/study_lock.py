"""Locks that serialise one short step of a shared study across its workers: claiming a trial.

Several workers that together run a fixed number of trials (``cadence tune --study-trials N``)
must count the study's trials and create the next one as one step, or two workers that finish
together both see N-1 and the study ends with N+1. Optuna has no such primitive, so each storage
gets the lock its own medium offers, chosen so that a worker that dies holding it (SIGKILL, a
lost machine) does not stop the others:

- PostgreSQL: a session-level advisory lock (``pg_advisory_lock``) on a connection of its own;
  the server drops it with the connection when the worker dies.
- SQLite (one machine): ``flock`` on a file beside the database; the kernel drops it with the
  process.
- a journal file (a shared filesystem, maybe NFS): Optuna's own ``JournalFileOpenLock`` (an
  ``O_EXCL`` lock file, the one the journal itself trusts on NFS), broken after a grace period
  (the step it guards takes milliseconds).

The lock is held for the milliseconds of a count and an insert, never while a trial trains.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

__all__ = ["StudyLock", "advisory_lock", "file_lock", "journal_lock", "no_lock"]

# A study name -> a context manager that holds the study's claim lock while it is entered.
StudyLock = Callable[[str], AbstractContextManager[None]]


def _key(study_name: str) -> int:
    """A stable signed 64-bit key for the study: what pg_advisory_lock takes."""
    digest = hashlib.sha256(f"cadence-study-claim:{study_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def advisory_lock(engine: Any) -> StudyLock:
    """PostgreSQL's session advisory lock, keyed by the study name, on ``engine``'s server."""
    from sqlalchemy import text

    @contextlib.contextmanager
    def hold(study_name: str) -> Iterator[None]:
        key = _key(study_name)
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})

    return hold


def file_lock(path: Path) -> StudyLock:
    """An exclusive ``flock`` on ``path`` (created on first use): for a SQLite file, which only
    processes of one machine share."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one worker per SQLite file
        return no_lock

    @contextlib.contextmanager
    def hold(study_name: str) -> Iterator[None]:
        with open(path, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    return hold


def journal_lock(journal: Path, grace_s: int) -> StudyLock:
    """Optuna's NFS-safe lock file beside the journal (``JOURNAL.claim.lock`` while held),
    taken from a worker that holds it for ``grace_s`` seconds (it died holding it)."""
    from optuna.storages.journal import JournalFileOpenLock

    @contextlib.contextmanager
    def hold(study_name: str) -> Iterator[None]:
        lock = JournalFileOpenLock(f"{journal}.claim", grace_period=grace_s)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    return hold


@contextlib.contextmanager
def no_lock(study_name: str) -> Iterator[None]:
    """For storages only one process uses (in memory), or that offer no lock (see storage.py)."""
    yield
