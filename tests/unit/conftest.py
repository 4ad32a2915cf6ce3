"""Shared fixtures for the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _single_thread(one_thread: None) -> None:
    """Every unit test runs on one torch thread (the fixture `one_thread` in tests/conftest.py)."""
