"""Shared fixtures for the integration tests: tiny configs, one CPU thread, no plots.

Configs are built from an empty YAML file (the dataclass defaults) rather than the default
recipe, so a test states every setting it depends on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from resume_helpers import no_plots, train_tiny_lm
from serve_helpers import LIMIT, Server, serve

import cadence
from cadence.config import Config

# Tiny models per workload: every test trains for well under a second per step on one core.
TINY: dict[str, list[str]] = {
    "lm": [
        "model.n_layer=1",
        "model.d_model=32",
        "model.n_head=2",
        "model.seq_len=16",
        "data.max_bytes=200000",
        "train.eval_samples=16",
    ],
    "mnist": ["model.arch=mlp", "model.hidden=[32]"],
    "mnist-cnn": ["model.arch=cnn"],
    "digits": ["model.hidden=[32]"],
    "logreg": [],
    # 2 of the 160 synthetic voices (44 clips); a narrow CNN
    "speech": ["data.voices=2", "model.channels=[8,16]", "train.eval_samples=64"],
    # clipped as in the recipe: plain SGD at 0.1 on CTC diverges within 25 steps without it
    "asr": [
        "data.voices=2",
        "model.d_model=32",
        "model.n_layer=1",
        "train.eval_samples=32",
        "train.clip_grad_norm=1.0",
    ],
}


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
def served_lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained GPT run (seq_len 32) shared by the serving tests, which only read it."""
    return train_tiny_lm(tmp_path_factory.mktemp("serve") / "lm")


@pytest.fixture(scope="module")
def lm_server(served_lm_run: Path) -> Iterator[Server]:
    """A real server on 127.0.0.1 holding the tiny GPT, stopped when the module ends."""
    yield from serve(served_lm_run, LIMIT)
