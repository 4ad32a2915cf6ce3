"""The benchmarks that only run now and then (a lent GPU, a quiet machine) still run: each is
started here at tiny sizes on CPU and must finish with its report. Their numbers are not
checked; speed is measured in benchmarks, never asserted in tests."""

from __future__ import annotations

from pathlib import Path

from cli_helpers import run_script_forked

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str, timeout: float) -> str:
    """The script in a child forked from this process (its imports already paid), on the CPU
    path as CI has it."""
    env = {"CUDA_VISIBLE_DEVICES": ""}
    proc = run_script_forked(script, *args, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_gpu_check_runs_at_tiny_sizes_on_cpu() -> None:
    out = _run(str(BENCHMARKS / "gpu.py"), "--tiny", timeout=600)
    for check in ("bf16 autocast vs fp32", "FSDP2 + bf16 vs fp32", "torch.compile vs eager"):
        line = next(row for row in out.splitlines() if row.startswith(f"| {check} |"))
        assert "| ok |" in line, line
    assert "| host syncs per step | n/a |" in out
    rows = [r for r in out.splitlines() if r.startswith(("| adamw |", "| muon |"))]
    assert [r.split("|")[2].strip() for r in rows] == ["eager", "compiled"] * 2, rows


def test_inspect_overhead_runs_at_tiny_sizes() -> None:
    out = _run(
        str(BENCHMARKS / "inspect_overhead.py"),
        *("--tiny", "--steps", "3", "--rounds", "1"),
        timeout=600,
    )
    rows = [r for r in out.splitlines() if r.startswith("| ") and "variant" not in r]
    assert [r.split("|")[1].strip() for r in rows] == [
        "off",
        "inspect 10",
        "inspect 100",
        "spike warn",
        "sharpness 100",
    ]


def test_checkpoint_stall_runs_at_tiny_sizes() -> None:
    out = _run(
        str(BENCHMARKS / "checkpoint_stall.py"), "--small", "--steps", "4", "--every", "2",
        timeout=600,
    )  # fmt: skip
    assert [r.split("|")[1].strip() for r in out.splitlines() if r.startswith("| s")] == [
        "synchronous"
    ]
    assert any(r.startswith("| background thread |") for r in out.splitlines())


def test_time_to_target_runs_with_a_short_budget() -> None:
    # eager: the default recipe's horizon would compile its GPT (train.compile: auto), C++
    # builds that cost a minute here and that test_compiling and gpu.py already cover
    out = _run(
        str(BENCHMARKS / "time_to_target.py"),
        *("--budget", "2", "--eval-every", "5", "--set", "train.compile=false"),
        *("--set", "model.n_layer=1", "--set", "train.eval_samples=64"),
        timeout=600,
    )
    assert "| plain AdamW, constant LR |" in out and "| cadence default |" in out
    assert "cadence / plain time to L:" in out or "did not reach L" in out


def test_lr_methods_runs_at_tiny_sizes() -> None:
    out = _run(
        str(BENCHMARKS / "lr_methods.py"),
        *("--workloads", "mnist", "--grid", "2", "--max-steps", "40"),
        timeout=600,
    )
    methods = [r.split("|")[2].strip() for r in out.splitlines() if r.startswith("| mnist |")]
    assert methods == ["grid (2 LRs)", "find-lr (range test)", "tune (2 trials, median pruner)"]


def test_mup_transfer_runs_at_tiny_sizes(tmp_path) -> None:
    out = _run(
        str(BENCHMARKS / "mup_transfer.py"),
        *("--widths", "32,64", "--lrs", "0.002,0.008", "--steps", "2", "--tune-trials", "1"),
        *("--base-width", "32", "--n-layer", "1", "--seq-len", "16", "--batch", "4"),
        *("--set", "train.eval_samples=16"),
        *("--out", str(tmp_path)),
        timeout=600,
    )
    assert "best LR per width" in out and "cadence tune at d_model 32" in out
    assert len(list(tmp_path.glob("mup_transfer-*.png"))) == 1


def test_weight_averaging_runs_at_tiny_sizes(tmp_path) -> None:
    out = _run(
        str(BENCHMARKS / "weight_averaging.py"),
        # one thread, as every process a test starts: the script's default of every core
        # spin-waits against the suite's other worker (several times slower on two cores)
        *("--quick", "--threads", "1", "--out", str(tmp_path)),
        timeout=600,
    )
    assert "| constant | 0 |" in out and len(list(tmp_path.glob("weight_averaging-*.json"))) == 1


def test_dp_runs_at_tiny_sizes(tmp_path) -> None:
    out = _run(
        str(BENCHMARKS / "dp.py"),
        *("--quick", "--threads", "1", "--out", str(tmp_path)),
        timeout=600,
    )
    assert "| 8 | 256 | 1 |" in out and out.count("| best |") == 1
    assert len(list(tmp_path.glob("dp-*.json"))) == 1
