"""DDP and FSDP2 on 2 CPU processes (gloo) against one process: same numbers, any world size.

The global batch is drawn identically on every rank and each rank's loss is normalised by the
global batch, so a run must not depend on how many processes computed it: per-step losses,
gradient norms, learning rates and validation losses agree with the one-process run to float
tolerance (reduction order differs), and so do the final weights. DDP checkpoints hold whole
tensors and FSDP ones are resharded on load, so a run saved on 2 processes resumes on 1 and vice
versa.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model

from cadence.cli import main as cadence_main
from cli_helpers import Forked, ForkedCLI, as_sets

from .conftest import (
    DIGITS,
    LM,
    assert_same_rows,
    assert_same_weights,
    launch_here,
    rows,
    run,
    run_in_process,
    torchrun_cmd,
    truncated_copy,
)

# 12 steps, evaluated and checkpointed every 4: the runs the equivalence, resume and rank-0 tests
# share.
LM_RUN = [*LM, "train.max_steps=12", "train.eval_every=4", "train.checkpoint_every=4"]
LM_RUN += ["train.keep_checkpoints=10", "train.inspect_every=4"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process (ddp and fsdp configs) in this process; 2 processes under --nproc/torchrun."""
    root = tmp_path_factory.mktemp("lm")
    out: dict = {"root": root}
    for mode in ("ddp", "fsdp"):
        cfg = [*LM_RUN, f"train.distributed={mode}"]
        one = root / f"{mode}-1"
        run_in_process("train", *as_sets(cfg), "--run-dir", str(one))
        two = root / f"{mode}-2"
        stdout = launch_here("train", *as_sets(cfg), "--run-dir", str(two), "--nproc", "2")
        out[mode] = {"one": one, "two": two, "stdout": stdout, "cfg": cfg}
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_on_lm(lm: dict, mode: str) -> None:
    one, two = lm[mode]["one"], lm[mode]["two"]
    got, want = rows(two), rows(one)
    assert [r["step"] for r in got] == list(range(1, 13))
    assert sum("val_loss" in r for r in got) == 3  # steps 4, 8, 12
    assert_same_rows(got, want)
    assert_same_weights(two / "model.safetensors", one / "model.safetensors")
    s2 = json.loads((two / "summary.json").read_text())
    s1 = json.loads((one / "summary.json").read_text())
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert (s2["steps"], s2["tokens"], s2["stop_reason"]) == (12, 12 * 7 * 16, "max_steps")
    assert s2["params"] == s1["params"]  # the whole model, not one rank's shard


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_per_layer_health_is_the_whole_models_on_any_number_of_processes(
    lm: dict, mode: str
) -> None:
    """Sharded norms summed, DDP's whole ones not double-counted, activations over every
    process's share of the batch (7 samples split 4 + 3, in micro-batches of 2)."""

    def records(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "inspect.jsonl").read_text().splitlines()]

    got, want = records(lm[mode]["two"]), records(lm[mode]["one"])
    assert [r["step"] for r in got] == [r["step"] for r in want] == [4, 8, 12]
    for a, b in zip(got, want):
        assert a["layers"].keys() == b["layers"].keys() == {"tok_emb", "blocks.0", "norm_f"}
        assert "attn_entropy" in a["layers"]["blocks.0"]
        for layer, stats in b["layers"].items():
            assert a["layers"][layer].keys() == stats.keys()
            for stat, value in stats.items():
                assert a["layers"][layer][stat] == pytest.approx(value, rel=1e-4), (layer, stat)


def test_fsdp_and_ddp_configs_agree_on_one_process(lm: dict) -> None:
    # train.distributed=fsdp on one process saves sharded (DCP) checkpoints; the same run.
    assert_same_rows(rows(lm["fsdp"]["one"]), rows(lm["ddp"]["one"]), rtol=0)
    assert_same_weights(
        lm["fsdp"]["one"] / "model.safetensors", lm["ddp"]["one"] / "model.safetensors", rtol=0
    )


def test_ddp_matches_one_process_on_digits_with_plain_torchrun(tmp_path: Path) -> None:
    # batch 9 over 2 ranks with micro-batches of 2: rank 0 runs 3 micro-batches, rank 1 two
    # (plus an empty one so the collectives line up).
    cfg = [*DIGITS, "train.max_steps=8", "train.eval_every=4"]
    run_in_process("train", *as_sets(cfg), "--run-dir", str(tmp_path / "one"))
    run(torchrun_cmd(2, "train", *as_sets(cfg), "--run-dir", str(tmp_path / "two")))
    got, want = rows(tmp_path / "two"), rows(tmp_path / "one")
    assert [r["step"] for r in got] == list(range(1, 9))
    assert_same_rows(got, want)
    for key in ("val_accuracy",):
        assert [r.get(key) for r in got] == [r.get(key) for r in want]
    assert_same_weights(tmp_path / "two" / "model.safetensors", tmp_path / "one/model.safetensors")


# ---------------------------------------------------------------- schedule-free, target stop


@pytest.fixture(scope="module")
def schedule_free(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """schedulefree-adamw: FSDP to 10 steps; DDP with a target first reached at step 6."""
    root = tmp_path_factory.mktemp("sf")
    base = [*LM, "optimizer.name=schedulefree-adamw", "train.max_steps=10", "train.eval_every=2"]
    ref = root / "one"
    run_in_process("train", *as_sets(base), "--run-dir", str(ref))
    val = {r["step"]: r["val_loss"] for r in rows(ref) if "val_loss" in r}
    assert val[6] < min(val[2], val[4]), f"the reference's val loss does not fall: {val}"
    target = (min(val[2], val[4]) + val[6]) / 2  # first reached at step 6
    with_target = [*base, f"train.target={target!r}"]
    ref_target = root / "one-target"
    run_in_process("train", *as_sets(with_target), "--run-dir", str(ref_target))
    ddp = root / "ddp-target"
    launch_here("train", *as_sets(with_target), "--run-dir", str(ddp), "--nproc", "2")
    fsdp = root / "fsdp"
    cfg = [*base, "train.distributed=fsdp"]
    launch_here("train", *as_sets(cfg), "--run-dir", str(fsdp), "--nproc", "2")
    return {"ref": ref, "ref_target": ref_target, "ddp": ddp, "fsdp": fsdp}


def test_schedule_free_under_fsdp_matches_one_process(schedule_free: dict) -> None:
    ref, fsdp = schedule_free["ref"], schedule_free["fsdp"]
    assert_same_rows(rows(fsdp), rows(ref))
    # model.safetensors holds the averaged (evaluation) weights in both runs.
    assert_same_weights(fsdp / "model.safetensors", ref / "model.safetensors")


def test_schedule_free_under_ddp_stops_at_target_on_every_rank(schedule_free: dict) -> None:
    # A rank that stopped alone would leave the other waiting in a collective: the run ends
    # cleanly (exit 0, checked by run()) only if every rank stopped at the same step.
    ref, ddp = schedule_free["ref_target"], schedule_free["ddp"]
    summary = json.loads((ddp / "summary.json").read_text())
    assert (summary["stop_reason"], summary["steps"], summary["target_step"]) == ("target", 6, 6)
    assert json.loads((ref / "summary.json").read_text())["steps"] == 6
    got = rows(ddp)
    assert [r["step"] for r in got] == list(range(1, 7))
    assert_same_rows(got, rows(ref))
    assert_same_weights(ddp / "model.safetensors", ref / "model.safetensors")
    assert (ddp / "checkpoints" / "step_00000006").is_dir()  # saved on stopping


# ---------------------------------------------------------------- resume across world sizes


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("direction", ["2->1", "1->2"])
def test_resume_across_world_sizes(lm: dict, mode: str, direction: str, tmp_path: Path) -> None:
    """A run checkpointed at step 4 on N processes continues on M like the uninterrupted run."""
    runs = lm[mode]
    source = runs["two"] if direction == "2->1" else runs["one"]
    resumed = truncated_copy(source, tmp_path / "run", step=4)
    if direction == "2->1":
        run_in_process("train", "--resume", str(resumed))
    else:
        launch_here("train", "--resume", str(resumed), "--nproc", "2")
    reference = lm["ddp"]["one"]  # the uninterrupted one-process run (same numbers for fsdp)
    got = rows(resumed)
    assert [r["step"] for r in got] == list(range(1, 13))
    assert_same_rows(got, rows(reference))
    assert_same_weights(resumed / "model.safetensors", reference / "model.safetensors")
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 12


# ---------------------------------------------------------------- rank 0 alone writes


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_only_rank_zero_writes(lm: dict, mode: str) -> None:
    two, stdout = lm[mode]["two"], lm[mode]["stdout"]
    steps = [r["step"] for r in rows(two)]
    assert steps == sorted(set(steps)) == list(range(1, 13))  # each step once
    assert stdout.count("run finished") == 1, stdout
    ckpts = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert ckpts == ["step_00000004", "step_00000008", "step_00000012"]  # no leftover temp dirs
    events = list((two / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    leftovers = [p.name for p in two.iterdir() if p.name.startswith(".") or "tmp" in p.name]
    assert leftovers == []


def test_fsdp_weights_load_into_a_fresh_model(lm: dict) -> None:
    """The consolidated FSDP2 weights are a plain model: load_run and load_model both work and
    give back the run's final validation loss."""
    from cadence.deploy import load_run
    from cadence.run import load_config
    from cadence.workloads import build_model, build_workload

    two = lm["fsdp"]["two"]
    final_val = rows(two)[-1]["val_loss"]
    cfg = load_config(two / "config.yaml")
    workload = build_workload(cfg, tokenizer_dir=two)
    loaded = load_run(two)
    fresh = build_model(cfg, vocab_size=loaded.tokenizer.vocab_size)
    missing, unexpected = load_model(fresh, str(two / "model.safetensors"), strict=True)
    assert not missing and not unexpected
    for model in (loaded.model, fresh):
        model.eval()
        val = workload.evaluate(model)["val_loss"]
        assert val == pytest.approx(final_val, rel=1e-5)
    for a, b in zip(loaded.model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- failures


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def _started(pid: int) -> int:
    """When a process started (clock ticks since boot; /proc/PID/stat field 22)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def test_killed_rank_fails_the_run_instead_of_hanging(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # eager: a budget this long would compile the GPT under train.compile: auto, and a rank busy
    # building C++ for minutes does not reach the collective that notices its peer is gone
    cfg = [
        *LM, "train.max_steps=100000", "train.eval_every=1000", "train.dist_timeout_s=20",
        "train.compile=false",
    ]  # fmt: skip
    # forked from this process (its own process group, as a new session would be)
    proc = ForkedCLI("train", *as_sets(cfg), "--run-dir", str(run_dir), "--nproc", "2")
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        # Wait until both ranks train (rank 0 has written metrics rows). The ranks are the
        # launcher's children (forked from it on a machine without CUDA).
        while time.monotonic() < deadline and proc.poll() is None:
            workers = _descendants(proc.pid)
            metrics = run_dir / "metrics.jsonl"
            logged = metrics.read_text().count("\n") if metrics.exists() else 0
            if len(workers) == 2 and logged >= 3:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
        assert len(workers) == 2, workers
        # the rank started last (rank 1, as the agent starts them in order)
        os.kill(max(workers, key=_started), signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the run hung for 60 s after a rank was killed")
        assert proc.returncode != 0
        assert time.monotonic() - killed_at < 60
        assert "cadence: error: rank" in stderr, stderr[-3000:]
        for pid in workers:  # no orphaned worker left behind
            assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_bad_config_fails_once_before_launching(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", *as_sets([*LM, "optimizer.lr=-1"]), "--run-dir", str(run_dir), "--nproc", "2"]

    def without_omp_setting() -> int:
        # without OMP_NUM_THREADS (tests/conftest.py sets it), so torchrun would warn that it
        # sets it
        os.environ.pop("OMP_NUM_THREADS", None)
        return cadence_main(args)

    proc = Forked(without_omp_setting)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cadence: error: optimizer.lr"), stderr
    assert "OMP_NUM_THREADS" not in stdout + stderr  # torchrun never started
    assert not run_dir.exists()
