"""Helpers for the multi-process tests: tiny configs, the CLI under torchrun, run comparisons.

Most 2-process runs are `cadence train --nproc 2` called in this process (`launch_here`):
torchrun's agent, with its rendezvous and monitoring, forks the two ranks (gloo on CPU) from
this interpreter, so they skip the seconds of imports a fresh one pays. A few tests launch
`torchrun` itself, or the CLI as a child process, where that path is what they test. The tests
still share runs through module-scoped fixtures. One-process reference runs go through the same
CLI entry point in this process (`cadence.cli.main`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.torch import load_file

from cadence.cli import main as cadence_main
from cli_helpers import cli_env

# The tiny GPT: a step takes milliseconds on one core. batch.size=7 with micro_size=2 splits 4/3
# over two ranks, so each rank accumulates two micro-batches and the shares are uneven. AdamW,
# not the default recipe's Muon: these tests hold the data and gradient paths to one process at
# AdamW's tolerances; Muon's bf16 Newton-Schulz makes two processes differ from one by ~1e-3
# (reduction order flips roundings), which test_hf_distributed and test_sharded_checkpoints
# check at that tolerance.
LM = [
    "workload=lm",
    "optimizer.name=adamw",
    "optimizer.lr=0.003",
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "model.seq_len=16",
    "data.max_bytes=100000",
    "batch.size=7",
    "batch.micro_size=2",
    "schedule.warmup=2",
    "train.eval_samples=16",
    "train.threads=1",
    "train.progress=false",
    "train.log_every=1",
    "train.dist_timeout_s=60",
]

# The digits MLP: batch.size=9 with micro_size=2 splits 5/4, i.e. three micro-batches on rank 0
# and two on rank 1 (padded with an empty one so both run the same number of passes).
DIGITS = [
    "workload=digits",
    "model.hidden=[32]",
    "optimizer.lr=0.01",
    "batch.size=9",
    "batch.micro_size=2",
    "schedule.warmup=2",
    "train.eval_samples=256",
    "train.threads=1",
    "train.progress=false",
    "train.log_every=1",
    "train.dist_timeout_s=60",
]

# Per-step values that must not depend on the number of processes (time fields do).
COMPARED = ("samples", "lr", "batch_size", "train_loss", "grad_norm", "val_loss", "tokens")
RTOL = 1e-5
ATOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def _no_plots() -> Iterator[None]:
    """No PNG plots from the runs trained in this process or forked from it (`run_in_process`,
    `launch_here`): matplotlib takes a second or more per run, several times what these tiny
    runs train, and no test here looks at a plot. Module-scoped (and autouse, so set up before
    a module's own fixtures that train), not session-scoped: undone after each module, so an
    integration test that checks plots and runs later on the same xdist worker still gets them.
    A run in a fresh interpreter (`run`, plain torchrun) still plots."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("cadence.run.rundir.plot_run", lambda *a, **k: None)
        yield


def free_port() -> int:
    """A port nothing listens on now, for a rendezvous endpoint on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    """Plain torchrun (`python -m torch.distributed.run`) of `python -m cadence ARGS`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "cadence",
        *args,
    ]


def run(cmd: Sequence[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; a failure shows the end of its output."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=cli_env())
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd[:6])} ... exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
        )
    return proc


def run_in_process(*args: str) -> None:
    """One process, through the CLI's entry point (no interpreter start-up)."""
    rc = cadence_main(list(args))
    assert rc == 0, f"cadence {' '.join(args)} exited {rc}"


def launch_here(*args: str) -> str:
    """`cadence ARGS` (with `--nproc N`) in this process; its output and its ranks'.

    The ranks are forked from this process and write to the inherited descriptors and to the
    inherited `sys.stdout`/`sys.stderr` objects, both of which point at one temporary file for
    the duration (pytest's own capture replaces `sys.stdout`, so descriptors alone would miss
    what the ranks print).
    """
    with tempfile.TemporaryFile() as sink:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        saved = os.dup(1), os.dup(2)
        streams = sys.stdout, sys.stderr
        text = io.TextIOWrapper(os.fdopen(os.dup(sink.fileno()), "wb"), write_through=True)
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            sys.stdout = sys.stderr = text
            rc = cadence_main(list(args))
        finally:
            text.flush()
            sys.stdout, sys.stderr = streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            text.close()
        sink.seek(0)
        output = sink.read().decode(errors="replace")
    assert rc == 0, f"cadence {' '.join(args[:4])} ... exited {rc}\n{output[-5000:]}"
    return output


def rows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def weights(path: Path) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in load_file(str(path)).items()}


def assert_same_rows(
    got: list[dict[str, Any]], want: list[dict[str, Any]], rtol: float = RTOL
) -> None:
    """Same steps, and per step the same values of COMPARED within float tolerance."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in COMPARED:
            assert (key in a) == (key in b), f"step {a['step']}: {key} in only one run"
            if key in a:
                np.testing.assert_allclose(
                    a[key], b[key], rtol=rtol, atol=ATOL, err_msg=f"step {a['step']}: {key}"
                )


def assert_same_weights(got: Path, want: Path, rtol: float = RTOL, atol: float = 1e-6) -> None:
    a, b = weights(got), weights(want)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)


def truncated_copy(src: Path, dst: Path, step: int) -> Path:
    """A run directory as it was at `step`: config, tokenizer, that checkpoint, metrics <= step."""
    dst.mkdir(parents=True)
    for name in ("config.yaml", "tokenizer.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    ckpt = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / ckpt, dst / "checkpoints" / ckpt)
    kept = [json.dumps(r) for r in rows(src) if r["step"] <= step]
    (dst / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    return dst
