"""A prepared corpus on 2 CPU processes against one: the same windows, so the same run.

Both sampling modes address windows by (seed, sample index) and every rank draws the same
global batch, so the number of processes changes only the order of float additions.
"""

from __future__ import annotations

import pytest

from cadence.data.prepare import prepare_corpus
from cli_helpers import as_sets

from .conftest import (
    LM,
    assert_same_rows,
    assert_same_weights,
    launch_here,
    rows,
    run_in_process,
)


@pytest.mark.parametrize("sampling", ["packed", "random"])
def test_two_processes_match_one_on_prepared_data(tmp_path, sampling: str) -> None:
    import email

    out = tmp_path / "corpus"
    prepare_corpus([email.__path__[0]], out, tokenizer="byte", val_fraction=0.1, progress=False)
    cfg = [*LM, f"data.path={out}", f"data.sampling={sampling}", "train.max_steps=6"]
    cfg += ["train.eval_every=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_in_process("train", *as_sets(cfg), "--run-dir", str(one))
    launch_here("train", *as_sets(cfg), "--run-dir", str(two), "--nproc", "2")
    assert_same_rows(rows(two), rows(one))
    assert_same_weights(two / "model.safetensors", one / "model.safetensors")
