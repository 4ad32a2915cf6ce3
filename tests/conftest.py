"""Fixtures shared by the unit and the integration tests.

Nothing here is autouse: each directory's conftest.py opts in (tests/distributed does not).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


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
