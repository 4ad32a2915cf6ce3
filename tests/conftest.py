"""Fixtures shared by the unit and the integration tests, and how pytest-xdist spreads them.

Nothing here is autouse but the data cache: each directory's conftest.py opts in to the rest
(tests/distributed does not).

The suite runs on pytest-xdist (``-n auto --dist loadgroup`` in pyproject.toml): tests go one by
one to whichever worker is free, except those that share something expensive, which
:func:`pytest_collection_modifyitems` keeps on one worker so it is built once: every test that
uses the same module- or session-scoped fixture of a test file or conftest, and all of
tests/distributed (each of its tests starts two torchrun processes; run one after another on
one worker they take two cores beside the other worker's one, not four).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

# Every process a test starts (the CLI, torchrun's ranks, a benchmark script) takes one
# intra-op thread, as the tests themselves do (`one_thread`): with xdist's workers on every core,
# a child's default of one thread per core oversubscribes them, and OpenMP's spin-waiting burns
# the time the other worker needs. Set before torch is imported, so this process reads it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from cadence.data.cache import CACHE_ENV  # noqa: E402


@pytest.fixture(scope="session")
def one_thread() -> Iterator[None]:
    """One torch intra-op thread until the session ends, then torch's previous setting.

    The models and tensors in these tests are tiny: intra-op threads only add spin-wait overhead
    and contention, which on a busy two-core machine made steps many times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Corpora are prepared into a cache shared by this session's tests (and the processes they
    start), never into the user's own ~/.cache. Under xdist the workers share one cache (in the
    run's common temporary folder): the cache's own file lock lets one worker prepare a corpus
    while the others wait for it, instead of each preparing its own copy."""
    before = os.environ.get(CACHE_ENV)
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = base.parent / "cadence-cache"  # basetemp is <run>/popen-gwN under xdist
        shared.mkdir(exist_ok=True)
        os.environ[CACHE_ENV] = str(shared)
    else:
        os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("cadence-cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


# The project's shared fixtures that are cheap or per-process by design: no reason to keep tests
# together. (pytest's and plugins' own fixtures have an empty baseid and never count.)
_CHEAP = frozenset({"one_thread", "data_cache", "_single_thread", "empty_yaml", "tiny_lm_cached"})


def _group(item: pytest.Item) -> str | None:
    """The xdist group of a test: what expensive shared fixture it uses, if any."""
    path = item.path.as_posix()
    if "/tests/distributed/" in path:
        return "distributed"
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    shared = [
        (defs[-1].scope, name, defs[-1].baseid)
        for name, defs in info.name2fixturedefs.items()
        if defs and defs[-1].baseid and name not in _CHEAP and defs[-1].scope != "function"
    ]
    if not shared:
        return None
    # a session fixture may serve several files: its name is the group; a module fixture's
    # file is (one build per file and worker either way, so the file stays together)
    sessions = sorted(name for scope, name, _ in shared if scope in ("session", "package"))
    return sessions[0] if sessions else item.path.name


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = _group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
