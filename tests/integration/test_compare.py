"""End-to-end `cadence compare` on a tiny spec: 2 strategies x 2 workloads x 2 seeds, --jobs 2.

One comparison is started in a subprocess and interrupted with Ctrl-C (SIGINT to its process
group, as a terminal sends it), then resumed in-process to the end; the tests check the reports,
that no finished run was trained twice, and that the HTML renders in headless Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from browser import CHROMIUM, colours, render
from cadence.bench import compare, load_spec
from cadence.config import ConfigError

SPEC = """
name: tiny
seeds: 2
defaults: {train.eval_every: 5, train.log_every: 5}
workloads:
  logreg: {target: 0.05, max_steps: 60}
  digits: {target: 0.6, max_steps: 60, set: {model.hidden: [16]}}
strategies:
  sgd: {set: {optimizer.name: sgd, optimizer.lr: 0.3, batch.size: 32}}
  adamw:
    set: {optimizer.name: adamw, optimizer.lr: 0.01, batch.size: 32, schedule.name: cosine}
    per_workload: {logreg: {optimizer.lr: 0.03}}
"""


def _finished(out: Path) -> dict[str, float]:
    """Run dirs whose summary says they finished (not interrupted) -> summary.json mtime."""
    done = {}
    for path in (out / "runs").glob("*/*/*/*/summary.json"):
        summary = json.loads(path.read_text())
        if not str(summary.get("stop_reason") or "").startswith("interrupted"):
            done[str(path.parent.relative_to(out))] = path.stat().st_mtime_ns
    return done


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("compare")
    spec_path = root / "tiny.yaml"
    spec_path.write_text(SPEC)
    out = root / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cadence", "compare", str(spec_path), "--out", str(out)]
        + ["--jobs", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not _finished(out):
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the workers too
    first_output, _ = proc.communicate(timeout=120)
    before = _finished(out)
    started_before = (out / "runs.log").read_text().count(" start ")

    lines: list[str] = []
    t0 = time.perf_counter()
    results = compare(load_spec(spec_path), out, jobs=2, log=lines.append)
    return {
        "out": out,
        "results": results,
        "before": before,
        "started_before": started_before,
        "first_rc": proc.returncode,
        "first_output": first_output,
        "resume_s": time.perf_counter() - t0,
    }


def test_interrupted_compare_resumes_without_repeating_finished_runs(compared) -> None:
    out, before = compared["out"], compared["before"]
    assert before, f"no run finished before the interrupt:\n{compared['first_output']}"
    after = _finished(out)
    assert len(after) == 8
    for run, mtime in before.items():
        assert after[run] == mtime, f"{run} was trained again"
    started_after = (out / "runs.log").read_text().count(" start ")
    assert started_after - compared["started_before"] == 8 - len(before)
    assert compared["results"]["counts"]["skipped"] == len(before)
    # A third invocation has nothing left to do.
    again = compare(load_spec(out / "spec.yaml"), out, jobs=2, log=lambda _: None, report=False)
    assert again["counts"] == {"total": 8, "skipped": 8, "ran": 0, "failed": 0}
    assert (out / "runs.log").read_text().count(" start ") == started_after


def test_reports_and_results_hold_every_number(compared) -> None:
    out = compared["out"]
    for name in ("results.json", "report.md", "report.html", "plots/profiles.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    assert len(data["runs"]) == 8
    assert {(r["strategy"], r["workload"]) for r in data["table"]} == {
        (s, w) for s in ("sgd", "adamw") for w in ("logreg", "digits")
    }
    for row in data["table"]:
        assert row["runs"] == 2
        for key in ("steps_to_target", "samples_to_target", "time_to_target"):
            assert set(row[key]) == {"median", "lo", "hi"}
        if row["reached"] == 2:
            assert row["steps_to_target"]["median"] > 0
            assert row["time_to_target"]["lo"] <= row["time_to_target"]["hi"]
    for run in data["runs"]:
        cfg = (Path(run["run_dir"]) / "config.yaml").read_text()
        assert "threads: 1" in cfg and "progress: false" in cfg
        if run["reached"]:
            assert run["steps_to_target"] <= 60
    for measure in ("time", "steps", "samples"):
        scores = data["profiles"][measure]["score"]
        assert set(scores) == {"sgd", "adamw"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    md = (out / "report.md").read_text()
    assert "| workload | strategy |" in md and "plots/curves-logreg.png" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # two workloads + the profile plot
    assert "http://" not in html and "https://" not in html  # self-contained


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="headless Chromium not installed (/usr/bin/chromium)"
)
def test_html_report_renders_in_headless_chromium(compared, tmp_path: Path) -> None:
    dom, shot = render(compared["out"] / "report.html", tmp_path)
    assert 'data-loaded-images="3"' in dom, dom[:500]
    assert "Time to target" in dom
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert colours(shot) > 50  # plots drawn, not a blank page


def test_bad_specs_fail_with_one_line_naming_the_key(tmp_path: Path) -> None:
    cases = {
        "strategies:\n  a: {set: {optimizer.lr: 1}}\n": "workloads",
        "workloads: {logreg: {max_steps: 5}}\nstrategies: {a: {}}\n": "workloads.logreg.target",
        "workloads: {logreg: {target: 0.1, max_steps: 5}}\n"
        "strategies: {a: {set: {optimizer.name: adamx}}}\n": "optimizer.name",
        "workloads: {logreg: {target: 0.1, max_steps: 5}}\n"
        "strategies: {a: {tune: {optimizer.lr: 3}}}\n": "strategies.a.tune.optimizer.lr",
    }
    for i, (text, key) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
            load_spec(path)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="unknown suite"):
        load_spec("nope", suite=True)


def test_shipped_suites_are_valid() -> None:
    from cadence.bench.spec import suite_names

    assert {"seed", "modern", "finetune"} <= set(suite_names())
    for name in ("seed", "modern"):
        spec = load_spec(name, suite=True)
        assert len(spec.strategies) >= 8 and len(spec.workloads) >= 3
    spec = load_spec("finetune", suite=True)
    assert {"full", "frozen-body", "lora-r4", "lora-r16", "loraplus", "dora"} < set(spec.strategies)
    assert {"adamw-full", "adamw-lora"} < set(spec.strategies)


def test_cli_main_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cadence.cli import main

    assert main(["compare", str(tmp_path / "missing.yaml")]) == 2
    assert "spec file not found" in capsys.readouterr().err
    assert main(["compare"]) == 2
    shutil.rmtree(tmp_path, ignore_errors=True)
