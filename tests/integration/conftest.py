"""Shared fixtures for the integration tests: tiny configs, one CPU thread, no plots.

Configs are built from an empty YAML file (the dataclass defaults) rather than the default
recipe, so a test states every setting it depends on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from resume_helpers import TINY_LM, no_plots, train_tiny_lm
from serve_helpers import LIMIT, Server, serve
from trainer_helpers import TINY

import cadence
from cadence.config import Config


@pytest.fixture(autouse=True, scope="session")
def _single_thread(one_thread: None) -> None:
    """Every integration test runs on one torch thread (`one_thread` in tests/conftest.py)."""


@pytest.fixture
def plots_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PNG plots for the test: ``pytestmark = pytest.mark.usefixtures("plots_off")``."""
    no_plots(monkeypatch)


@pytest.fixture(scope="session")
def empty_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "empty.yaml"
    path.write_text("{}\n")
    return path


@pytest.fixture
def make_config(empty_yaml: Path) -> Callable[..., Config]:
    """``make_config("mnist", "optimizer.lr=0.1", ...)``: a tiny, quiet, validated config.

    The workload key may be ``mnist-cnn`` (the mnist workload with the CNN). Later overrides win.
    """

    def make(workload: str, *overrides: str) -> Config:
        name = "mnist" if workload == "mnist-cnn" else workload
        base = [f"workload={name}", *TINY[workload], "train.progress=false"]
        return cadence.load_config(empty_yaml, [*base, *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_lm_cached() -> None:
    """The tiny LM configs' corpora (TINY_LM's and TINY["lm"]'s) in the data cache before a test
    that counts the lines the CLI prints: the first run to read a corpus says that it prepares
    it, and which test comes first depends on how xdist spreads them."""
    from cadence.config import parse_config
    from cadence.workloads import build_workload

    build_workload(parse_config(None, TINY_LM))
    build_workload(parse_config(None, ["workload=lm", *TINY["lm"]]))


@pytest.fixture(scope="session")
def served_lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained GPT run (seq_len 32) shared by the serving tests, which only read it."""
    return train_tiny_lm(tmp_path_factory.mktemp("serve") / "lm")


@pytest.fixture(scope="module")
def lm_server(served_lm_run: Path) -> Iterator[Server]:
    """A real server on 127.0.0.1 holding the tiny GPT, stopped when the module ends."""
    yield from serve(served_lm_run, LIMIT)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server's URL for the shared-study tests (test_tune_storage.py).

    CADENCE_TEST_POSTGRES when set (.ci/run starts a server and sets it); else a throwaway server
    started here by the same script, .ci/postgres.sh, where the server's binaries are installed
    (stopped when the session ends); else the tests are skipped, except under CI=true, where a
    missing server is a failure: CI must not pass by skipping them.
    """
    import os
    import shutil
    import subprocess
    import tempfile

    given = os.environ.get("CADENCE_TEST_POSTGRES")
    if given:
        yield given
        return
    script = Path(__file__).resolve().parents[2] / ".ci" / "postgres.sh"
    in_ci = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
    folder = tempfile.mkdtemp(prefix="cadence-postgres-")  # not under pytest's 0700 basetemp:
    # as root, the server runs as the postgres user, which must reach its folder
    res = None
    if script.is_file() and shutil.which("bash"):
        res = subprocess.run(
            ["bash", str(script), "start", folder], capture_output=True, text=True, timeout=120
        )
    if res is None or res.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        why = "no .ci/postgres.sh" if res is None else res.stderr.strip()[-400:]
        message = f"no PostgreSQL server (set CADENCE_TEST_POSTGRES=postgresql://...): {why}"
        if in_ci:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield res.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(script), "stop", folder], capture_output=True, timeout=120)
