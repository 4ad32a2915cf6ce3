"""The two-"node" example of docs/scaling.md: two torchrun launchers meet through c10d rendezvous.

Each launcher is a node with one process; they find each other at --rdzv-endpoint on this machine,
exactly as two machines would at a shared address. The run must be the run one process trains.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cli_helpers import as_sets, cli_env

from .conftest import (
    DIGITS,
    assert_same_rows,
    free_port,
    rows,
    run_in_process,
)


def test_two_nodes_through_rendezvous_match_one_process(tmp_path: Path) -> None:
    cfg = [*DIGITS, "train.max_steps=6", "train.eval_every=3"]
    run_in_process("train", *as_sets(cfg), "--run-dir", str(tmp_path / "one"))
    port = free_port()
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        cmd += ["--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
        cmd += ["--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "cadence", "train", *as_sets(cfg)]
        cmd += ["--run-dir", str(tmp_path / "two-nodes")]
        nodes.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env()
            )
        )
    outputs = []
    try:
        for proc in nodes:
            out, _ = proc.communicate(timeout=240)
            outputs.append(out)
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    got = rows(tmp_path / "two-nodes")
    assert [r["step"] for r in got] == list(range(1, 7))
    assert_same_rows(got, rows(tmp_path / "one"))
    assert sum("run finished" in o for o in outputs) == 1  # rank 0's node alone reports
