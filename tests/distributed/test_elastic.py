"""Issue 36, part 2: elastic membership under `torchrun --nnodes MIN:MAX`.

Two torchrun agents on 127.0.0.1 are two nodes meeting at a c10d rendezvous, as in
test_multinode. A node that dies takes its agent and its worker with it (SIGKILL to both: the
agent starts its workers in sessions of their own, so killing its process group would not
reach them). The survivor's collective fails, its agent restarts it on the nodes that remain,
and `--resume auto` continues from the newest checkpoint on one process: the global batch is
the config's, so the losses must be the one-process run's from that checkpoint. A node that
joins a running job is used from the restart its arrival causes.

Node 0 hosts the rendezvous store (`is_host=true`): torchrun's c10d rendezvous lives in one
agent's process, and a job cannot outlive the node that holds it (docs/scaling.md says so).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cadence.config import ConfigError
from cadence.run.rundir import prepare_run_dir
from cli_helpers import as_sets, cli_env

from .conftest import (
    DIGITS,
    assert_same_rows,
    assert_same_weights,
    free_port,
    rows,
    run_in_process,
    truncated_copy,
)

# One pass per process (no batch.micro_size): after the loss, the survivor must accumulate.
ELASTIC = [*DIGITS, "batch.micro_size=null", "train.eval_every=100"]
# Quick failure detection for the test: keep-alive every second, a node dead after two missed
# beats; a round closes a second (5 s for the first, so both nodes make it) after its minimum.
# Not for a node that joins: with beats that tight, a joining agent has judged the running
# node dead and started a job of its own on the same directory (seen on torch 2.13); torch's
# default (5 s, 3 beats) is what the growing test uses.
FAST = "keep_alive_interval=1,keep_alive_max_attempt=2"


def agent(
    node: int,
    port: int,
    run_dir: Path,
    cfg: list[str],
    log: Path,
    fast: bool = True,
    last_call: int = 5,
    **env: str,
):
    """One node: a torchrun agent with one worker running `cadence train --resume auto`.
    ``fast``: the quick keep-alive (a node missing two one-second beats is dead); ``last_call``:
    how long node 0's first round waits for more nodes once it has its minimum (one)."""
    conf = f"last_call_timeout={last_call if node == 0 else 1},is_host={str(node == 0).lower()}"
    conf += f",{FAST}" if fast else ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2"]
    cmd += ["--nproc-per-node", "1", "--max-restarts", "2", "--monitor-interval", "0.5"]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    cmd += ["--rdzv-conf", conf, "-m", "cadence", "train", *as_sets(cfg)]
    cmd += ["--resume", "auto", "--run-dir", str(run_dir)]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**cli_env(), **env})


def process_tree(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(c) for c in path.read_text().split()] if path.exists() else []
    return [pid, *(k for kid in kids for k in process_tree(kid))]


def wait_rows(metrics: Path, n: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) > n:
            return
        assert all(p.poll() is None for p in procs), "a node exited early"
        time.sleep(0.005)
    raise AssertionError(f"no step {n} within {timeout} s")


def finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 180) -> list[str]:
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                for pid in reversed(process_tree(p.pid)):
                    os.kill(pid, signal.SIGKILL)
    return [log.read_text() for log in logs]


def written_by(run_dir: Path) -> dict[int, int]:
    """step -> the number of processes that wrote that checkpoint."""
    out = {}
    for folder in (run_dir / "checkpoints").glob("step_*"):
        meta = json.loads((folder / "checkpoint.json").read_text())
        out[meta["step"]] = meta["world_size"]
    return out


def test_a_job_that_loses_a_node_finishes_on_the_other_as_one_process_would(tmp_path):
    run = tmp_path / "run"
    cfg = [
        *ELASTIC,
        "train.max_steps=300",
        "train.checkpoint_every=20",
        "train.keep_checkpoints=20",
    ]
    port, logs = free_port(), [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = [agent(n, port, run, cfg, logs[n], last_call=3) for n in (0, 1)]
    wait_rows(run / "metrics.jsonl", 30, nodes)  # past the step-20 checkpoint
    assert written_by(run)[20] == 2  # both nodes trained until now
    for pid in reversed(process_tree(nodes[1].pid)):  # the agent and its worker, at once
        os.kill(pid, signal.SIGKILL)
    out = finish(nodes[:1], logs[:1])[0]
    assert nodes[0].returncode == 0, out[-4000:]
    assert "rank 0 lost the process group" in out  # one line, not a traceback
    resumed = int(re.search(r"torchrun restart 1: resuming \S+ from step_(\d+)", out).group(1))
    assert resumed >= 20 and resumed % 20 == 0
    share = -(-9 // 2)  # batch.size=9 over two processes: the larger share, 5
    assert "resuming on 1 process (the checkpoint was written by 2)" in out
    assert f"accumulates passes of at most {share} samples" in out
    assert [r["step"] for r in rows(run)] == list(range(1, 301))  # every step once
    assert written_by(run)[300] == 1

    # The reference: one process resumed from the same checkpoint.
    ref = truncated_copy(run, tmp_path / "ref", resumed)
    run_in_process("train", "--resume", str(ref))
    after = [r for r in rows(run) if r["step"] > resumed]
    assert_same_rows(after, [r for r in rows(ref) if r["step"] > resumed])
    assert_same_weights(run / "model.safetensors", ref / "model.safetensors")


def test_a_node_that_joins_a_running_job_is_used_from_the_restart_it_causes(tmp_path):
    """torch 2.13's agents share one TCP store across rendezvous rounds, and a round's new rank
    0 then never publishes the master address a joining node waits for (it hangs); with that
    sharing off (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, docs/scaling.md) the job grows.

    Node 0's worker is paused (SIGSTOP) from step 50 until its agent has seen node 1 waiting,
    so the growth comes at the same step however fast this machine starts node 1."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    cfg = [*ELASTIC, "train.max_steps=300", "train.checkpoint_every=100"]
    port, logs = free_port(), [tmp_path / "node0.log", tmp_path / "node1.log"]
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "LOGLEVEL": "INFO"}
    nodes = [agent(0, port, run, cfg, logs[0], fast=False, last_call=1, **env)]
    wait_rows(run / "metrics.jsonl", 50, nodes)  # one process is training
    worker = process_tree(nodes[0].pid)[1]
    os.kill(worker, signal.SIGSTOP)
    try:
        nodes.append(agent(1, port, run, cfg, logs[1], fast=False, **env))
        deadline = time.monotonic() + 120
        while "Detected 1 new nodes" not in logs[0].read_text():
            assert time.monotonic() < deadline and nodes[1].poll() is None, logs[1].read_text()
            time.sleep(0.05)
    finally:
        os.kill(worker, signal.SIGCONT)  # it takes the agent's SIGTERM, checkpoints, exits
    out = finish(nodes, logs)
    # The job's outcome is the host's exit status. The joining node's agent may exit 1 after a
    # complete run: torch 2.13's host agent can pass its exit barrier alone and close the store
    # while the other agent is still polling it ("failed to shutdown the rendezvous").
    assert nodes[0].returncode == 0, "\n".join(o[-3000:] for o in out)
    joined = re.search(r"interrupted \(SIGTERM\) at step (\d+); checkpoint saved", out[0])
    assert joined and int(joined.group(1)) < 100, out[0][-3000:]
    assert "resuming on 2 processes (the checkpoint was written by 1)" in "".join(out)
    assert written_by(run)[300] == 2
    assert [r["step"] for r in rows(run)] == list(range(1, 301))
    # the global batch never changed, so the run is the one-process run's
    run_in_process("train", *as_sets(cfg), "--run-dir", str(ref))
    assert_same_rows(rows(run), rows(ref))
    assert_same_weights(run / "model.safetensors", ref / "model.safetensors")


def test_a_worker_restarted_over_its_run_without_resume_auto_is_told_to_add_it(
    tmp_path, monkeypatch
):
    """torchrun's agent restarts a job whose membership changed with the same command line and
    no restart count; a plain `--run-dir` then finds its directory taken."""
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="resume it with `cadence train --resume"):
        prepare_run_dir(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    with pytest.raises(ConfigError, match="add --resume auto so that torchrun's restarts"):
        prepare_run_dir(tmp_path)
