"""Fixtures shared by the unit and the integration tests.

Nothing here is autouse but the data cache: each directory's conftest.py opts in to the rest
(tests/distributed does not).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from cadence.data.cache import CACHE_ENV


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
    start), never into the user's own ~/.cache."""
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("cadence-cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before
