"""`cadence compare` under the external and self rulesets, end to end on a tiny spec."""

from __future__ import annotations

import json
import math
from pathlib import Path

from cadence.bench import compare, load_spec
from cadence.cli.main import main

SPEC = """
name: rules
tuning: {ruleset: external, trials: 2, studies: 2}
defaults: {train.eval_every: 5, train.log_every: 5}
workloads:
  logreg: {target: 0.05, max_steps: 40}
strategies:
  sgd:
    set: {optimizer.name: sgd, optimizer.lr: 0.3, batch.size: 32}
    search: {optimizer.lr: {low: 0.03, high: 3.0, log: true}}
  adamw:
    set: {optimizer.name: adamw, optimizer.lr: 0.03, batch.size: 32}
    search: {optimizer.lr: {low: 0.003, high: 0.3, log: true}}
  sf:
    set: {optimizer.name: schedulefree-adamw, optimizer.lr: 0.03, batch.size: 32}
"""


def test_external_ruleset_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(SPEC)
    out = tmp_path / "out"
    results = compare(load_spec(path), out, jobs=2, log=lambda _: None)
    assert results["ruleset"] == "external" and results["counts"]["total"] == (2 + 2 + 1) * 2
    assert len(results["trials"]) == 10 and len(results["runs"]) == 6
    # Each study's result is its fastest trial on CPU time (inf for a miss).
    for best in results["runs"]:
        study = [
            t
            for t in results["trials"]
            if (t["strategy"], t["seed"]) == (best["strategy"], best["seed"])
        ]
        assert len(study) == (1 if best["strategy"] == "sf" else 2)
        assert best["cpu_to_target"] == min(t["cpu_to_target"] for t in study)
        if best["reached"]:
            assert 0 < best["cpu_to_target"] <= best["time_to_target"] * 1.5 + 0.05
    for row in results["table"]:
        bests = sorted(
            r["cpu_to_target"] for r in results["runs"] if r["strategy"] == row["strategy"]
        )
        median = math.inf if math.isinf(bests[1]) else (bests[0] + bests[1]) / 2
        assert row["cpu_to_target"]["median"] == median
    saved = json.loads((out / "results.json").read_text())
    assert saved["ruleset"] == "external" and set(saved["significance"]) <= {"logreg"}
    md = (out / "report.md").read_text()
    assert "Ruleset external" in md and "Why CPU time is the primary time" in md
    assert "winner of the fastest study" in md and "Is the lead more than noise?" in md
    # A second invocation finds every trial done.
    again = compare(load_spec(out / "spec.yaml"), out, jobs=1, log=lambda _: None, report=False)
    assert again["counts"]["ran"] == 0 and again["counts"]["skipped"] == 10


def test_ruleset_self_on_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(SPEC)
    out = tmp_path / "self"
    rc = main(["compare", str(path), "--out", str(out), "--ruleset", "self", "--jobs", "2"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["ruleset"] == "self" and results["counts"]["total"] == 3 * 2
    assert {r["trial"] for r in results["trials"]} == {"default"}
    lrs = {
        r["strategy"]: json.loads(json.dumps(r["params"])) for r in results["trials"]
    }  # no tuning point: the strategy's own settings
    assert all(p == {} for p in lrs.values())


def test_bad_ruleset_flags_are_one_line_errors(tmp_path: Path, capsys) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(SPEC)
    assert main(["compare", str(path), "--trials", "0"]) == 2
    assert "--trials: must be >= 1" in capsys.readouterr().err
    assert main(["compare", str(path), "--workloads", "mnist"]) == 2
    assert "--workloads: mnist is not a workload of spec rules" in capsys.readouterr().err
