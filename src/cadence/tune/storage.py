"""`cadence tune --storage`: where a study lives, and how its workers survive each other.

One string chooses the storage (what ``--storage`` takes):

- nothing: SQLite in the run directory (``RUN_DIR/study.db``), one machine;
- ``sqlite:///FILE``: a SQLite file of your own, shared by the processes of one machine;
- ``postgresql://USER@HOST[:PORT]/DB`` (or any SQLAlchemy URL Optuna's ``RDBStorage`` takes):
  a database server every worker reaches. Plain ``postgresql://`` (and ``postgres://``) is run
  on the psycopg 3 driver (``pip install 'cadence[postgres]'``), so users need not know
  SQLAlchemy's ``postgresql+psycopg://`` spelling;
- ``journal:PATH``: Optuna's journal file, for clusters that share a filesystem but run no
  database.

Every storage gets heartbeats (a running trial records one every ``heartbeat`` seconds) and a
retry: when a worker dies mid-trial (SIGKILL, preemption, a lost machine), the next worker that
asks for a trial finds the trial silent for two intervals, marks it FAIL and queues a new trial
with the same parameters (``RetryHeartbeatStaleTrialCallback``; system attributes
``failed_trial`` and ``retry_history`` name the trials it retries), which the next free worker
runs. On a journal file that is cadence's own heartbeat (journal.py): Optuna 5.1 has none there.

Errors are for people: a malformed URL, an unknown database, a missing driver or a server that
does not answer is one ``ConfigError`` naming ``--storage`` and what would fix it, before
anything is written. A password in the URL never reaches a log line, an error or tune.json:
:attr:`StudyStorage.display` masks it (better still, leave it out of the URL: psycopg reads
``PGPASSWORD`` and ``~/.pgpass``).
"""

from __future__ import annotations

import importlib.util
import inspect
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadence.config import ConfigError
from cadence.tune.study_lock import StudyLock, advisory_lock, file_lock, journal_lock, no_lock

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_MAX_RETRY",
    "StudyStorage",
    "database_error",
    "open_storage",
]

DEFAULT_HEARTBEAT_S = 60
DEFAULT_MAX_RETRY = 2  # a trial whose worker dies runs at most 3 times (an OOM kill repeats)
CONNECT_TIMEOUT_S = 10
TABLE_RACE_TRIES = 5  # an unreachable server is an error after this long, not a hang
JOURNAL_PREFIX = "journal:"
_EXAMPLES = "use sqlite:///FILE, postgresql://USER@HOST/DB or journal:PATH"
_DRIVER_HINT = {
    "postgresql": "pip install 'cadence[postgres]'",
    "mysql": "pip install pymysql and write mysql+pymysql://",
}


@dataclass(frozen=True)
class StudyStorage:
    """An opened storage: what ``optuna.create_study`` takes, and what the sweep needs around it."""

    backend: Any  # an optuna.storages.BaseStorage
    display: str  # the spec as given, any password masked: for logs and tune.json
    lock: StudyLock  # serialises claiming a trial across workers (study_lock.py)
    retry: Callable[[optuna.Study, FrozenTrial], None]  # queue a dead trial's params again
    heartbeat_s: int
    shared: bool  # named by the user (several workers may use it), not the run's own file


def open_storage(
    spec: str | None,
    out_dir: Path,
    *,
    heartbeat_s: int = DEFAULT_HEARTBEAT_S,
    max_retry: int = DEFAULT_MAX_RETRY,
) -> StudyStorage:
    """Open ``spec`` (see the module docstring; ``None`` is ``OUT_DIR/study.db``) with heartbeats
    every ``heartbeat_s`` seconds, a grace period of two beats, and up to ``max_retry`` retries of
    a trial whose worker died. Raises ``ConfigError`` for anything the user would fix."""
    if heartbeat_s < 1:
        raise ConfigError(f"--heartbeat: must be >= 1 second, got {heartbeat_s}")
    if max_retry < 0:
        raise ConfigError(f"--max-retry: must be >= 0, got {max_retry}")
    retry = _retry_callback(max_retry)
    if spec is None:
        url = f"sqlite:///{(Path(out_dir) / 'study.db').resolve()}"
        return _open_rdb(url, url, heartbeat_s, retry, shared=False)
    spec = spec.strip()
    if spec.startswith(JOURNAL_PREFIX):
        return _open_journal(spec, heartbeat_s, retry)
    return _open_rdb(spec, _mask(spec), heartbeat_s, retry, shared=True)


# ---------------------------------------------------------------- relational databases


def _mask(spec: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(spec).render_as_string(hide_password=True)
    except Exception:
        return spec.split("@")[-1] if "@" in spec else spec  # unparsable: drop any credentials


def _open_rdb(
    spec: str, display: str, heartbeat_s: int, retry: Callable[..., None], *, shared: bool
) -> StudyStorage:
    import optuna
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.engine import make_url

    try:
        url = make_url(spec)
    except sa_exc.ArgumentError:
        raise ConfigError(f"--storage {display}: not a database URL; {_EXAMPLES}") from None
    password = url.password

    def fail(problem: str) -> ConfigError:
        if password:
            problem = problem.replace(str(password), "***")
        return ConfigError(f"--storage {display}: {problem}")

    backend = url.get_backend_name()
    if backend == "postgres":  # the libpq spelling; SQLAlchemy only knows "postgresql"
        url = url.set(drivername="postgresql" + url.drivername[len("postgres") :])
        backend = "postgresql"
    if url.drivername == "postgresql":
        url = url.set(drivername=_postgres_driver(display))
    engine_kwargs: dict[str, Any] = {}
    if backend != "sqlite":
        engine_kwargs["pool_pre_ping"] = True  # a connection dropped during a long trial
    if backend == "postgresql" and "connect_timeout" not in url.query:
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    if backend == "sqlite" and url.database and url.database != ":memory:":
        folder = Path(url.database).expanduser().resolve().parent
        if not folder.is_dir():
            raise fail(f"the folder {folder} does not exist")
    kwargs = _heartbeat_kwargs(optuna.storages.RDBStorage, heartbeat_s, retry)
    try:
        storage = _rdb_storage(url.render_as_string(hide_password=False), engine_kwargs, kwargs)
    except sa_exc.NoSuchModuleError:
        raise fail(f"unknown database {url.drivername!r}; {_EXAMPLES}") from None
    except ImportError:
        hint = _DRIVER_HINT.get(backend, f"install a SQLAlchemy driver for {backend}")
        raise fail(f"no driver for {url.drivername} is installed: {hint}") from None
    except sa_exc.SQLAlchemyError as exc:
        cause = _first_line(getattr(exc, "orig", None) or exc)
        raise fail(
            f"cannot open the database ({cause}); check that the server runs and that the "
            "URL's host, port, user and database are right"
        ) from None
    except (RuntimeError, ValueError) as exc:  # Optuna's schema-version check
        raise fail(_first_line(exc)) from None
    return StudyStorage(
        backend=storage,
        display=display,
        lock=_rdb_lock(backend, storage, url),
        retry=retry,
        heartbeat_s=heartbeat_s,
        shared=shared,
    )


def _rdb_storage(url: str, engine_kwargs: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """``RDBStorage``, which creates Optuna's tables in a new database. Workers started together
    on an empty database race to create them, and all but one fail on PostgreSQL's catalog
    (``duplicate key ... pg_type_typname_nsp_index``): the losers try again, and then find the
    tables."""
    import optuna
    from sqlalchemy import exc as sa_exc

    for attempt in range(TABLE_RACE_TRIES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except (sa_exc.IntegrityError, sa_exc.ProgrammingError):
            if attempt == TABLE_RACE_TRIES - 1:
                raise
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def _first_line(exc: object) -> str:
    """A driver's message, often several lines (libpq adds hints), as one line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def database_error(exc: BaseException) -> str | None:
    """The first line of the database error behind ``exc`` raised mid-study (a server that went
    away, a connection cut), or None when there is none: a runtime fault of the machine, like a
    full disk, not a bug to show a traceback for. The whole chain is searched: Optuna re-raises a
    failed commit as its own StorageInternalError, and its trial loop can then fail on its own
    (seen with Optuna 5.1: an UnboundLocalError whose context is the database error)."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy import exc as sa_exc

    found: str | None = None
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, sa_exc.DBAPIError):
            return _first_line(getattr(e, "orig", None) or e)[:200]
        if isinstance(e, StorageInternalError) and found is None:
            found = _first_line(e)[:200]
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    return found


def _postgres_driver(display: str) -> str:
    """psycopg 3 (cadence's ``postgres`` extra), else psycopg2 if that is what is installed."""
    if importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg"
    if importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2"
    raise ConfigError(
        f"--storage {display}: no PostgreSQL driver is installed: {_DRIVER_HINT['postgresql']}"
    )


def _rdb_lock(backend: str, storage: Any, url: Any) -> StudyLock:
    if backend == "postgresql":
        return advisory_lock(storage.engine)
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            return no_lock
        return file_lock(Path(f"{Path(url.database).expanduser().resolve()}.lock"))
    # MySQL and the rest: no lock cadence has tested. With --study-trials N, workers that end
    # trials in the same instant may then run one trial more than N each.
    return no_lock


# ---------------------------------------------------------------- journal files


def _open_journal(spec: str, heartbeat_s: int, retry: Callable[..., None]) -> StudyStorage:
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    from cadence.tune.journal import HeartbeatJournalStorage

    given = spec[len(JOURNAL_PREFIX) :]
    if not given:
        raise ConfigError(
            f"--storage {spec}: give the journal file's path, e.g. journal:/shared/study.log"
        )
    path = Path(given).expanduser().resolve()
    if path.is_dir():
        raise ConfigError(f"--storage {spec}: {path} is a folder; name a file in it")
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise ConfigError(
            f"--storage {spec}: {path.parent} {what}; give a path in a folder on a "
            "filesystem every worker mounts"
        )
    # A worker killed while it appends to the journal leaves the journal's lock file behind;
    # the others break it after this long. Optuna's 30 s, shortened with the heartbeat: a lock
    # held for two beats belongs to a worker the heartbeat would call dead anyway.
    lock_grace = max(3, min(30, 2 * heartbeat_s))
    try:
        # creates the file when it is missing
        backend = JournalFileBackend(
            str(path), lock_obj=JournalFileSymlinkLock(str(path), grace_period=lock_grace)
        )
    except OSError as exc:
        raise ConfigError(
            f"--storage {spec}: cannot write {path} ({exc.strerror}); every worker needs write "
            "access to the journal and its folder"
        ) from None
    storage = HeartbeatJournalStorage(
        backend, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s, stale_callback=retry
    )
    return StudyStorage(
        backend=storage,
        display=f"{JOURNAL_PREFIX}{path}",
        lock=journal_lock(path, lock_grace),
        retry=retry,
        heartbeat_s=heartbeat_s,
        shared=True,
    )


# ---------------------------------------------------------------- Optuna across versions


def _retry_callback(max_retry: int) -> Callable[..., None]:
    """Optuna's retry of a stale trial (renamed in 4.9; the old name warns since)."""
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    cls = cls or optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(max_retry=max_retry)


def _heartbeat_kwargs(rdb: type, heartbeat_s: int, retry: Callable[..., None]) -> dict[str, Any]:
    """RDBStorage's heartbeat arguments; its callback argument was renamed in Optuna 4.9."""
    params = inspect.signature(rdb).parameters
    name = (
        "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback" in params
        else "failed_trial_callback"
    )
    return {"heartbeat_interval": heartbeat_s, "grace_period": 2 * heartbeat_s, name: retry}
