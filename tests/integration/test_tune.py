"""`cadence tune` (and the find-lr / find-batch commands) end to end on tiny workloads."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import yaml
from rich.console import Console

import cadence
from cadence.cli.tune import add_parsers
from cadence.config import ConfigError
from cadence.training import Trainer, fit
from cadence.tune.sweep import parse_space, run_sweep
from cadence.workloads import build_workload

BASE = [
    "batch.size=32",
    "train.max_steps=60",
    "train.eval_every=10",
    "train.log_every=10",
    "train.progress=false",
]
LR_SPACE = {"optimizer.lr": {"low": 2.0**-7, "high": 16.0, "log": True}}


def grid_best_lr(cfg) -> tuple[float, int]:
    """Exhaustive grid over powers of two: the best LR by best validation loss, and the steps."""
    results = {}
    steps = 0
    for k in range(-7, 5):
        lr = 2.0**k
        c = cadence.load_config("sgd-logreg", [*BASE, f"optimizer.lr={lr}"])
        summary = fit(Trainer(c, build_workload(c)))
        steps += summary["steps"]
        if summary["best_val_loss"] is not None and math.isfinite(summary["best_val_loss"]):
            results[lr] = summary["best_val_loss"]
    return min(results, key=results.get), steps


def test_tune_finds_the_grid_best_lr_within_a_factor_of_2(tmp_path):
    torch.set_num_threads(1)
    cfg = cadence.load_config("sgd-logreg", BASE)
    best_grid, grid_steps = grid_best_lr(cfg)
    result = run_sweep(cfg, LR_SPACE, trials=12, out_dir=tmp_path, pruner="median")
    lr = result.best_params["optimizer.lr"]
    assert best_grid / 2 <= lr <= best_grid * 2, (lr, best_grid)
    assert result.total_steps < grid_steps  # cheaper than the 12-point grid, thanks to pruning
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["optimizer"]["lr"] == pytest.approx(lr)
    assert cadence.load_config(tmp_path / "best.yaml").optimizer.lr == pytest.approx(lr)
    for name in ("history.png", "curves.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0


def test_pruning_stops_trials_early(tmp_path):
    torch.set_num_threads(1)
    cfg = cadence.load_config("sgd-logreg", BASE)
    result = run_sweep(cfg, LR_SPACE, trials=10, out_dir=tmp_path, pruner="median")
    pruned = [t for t in result.trials if t["state"] == "PRUNED"]
    assert result.n_pruned == len(pruned) >= 2
    assert all(t["steps"] < cfg.train.max_steps for t in pruned)
    complete = [t for t in result.trials if t["state"] == "COMPLETE"]
    assert all(t["steps"] == cfg.train.max_steps for t in complete)
    assert result.total_steps == sum(t["steps"] for t in result.trials)
    data = json.loads((tmp_path / "tune.json").read_text())
    assert data["n_pruned"] == result.n_pruned


def test_bad_search_spaces_name_the_key():
    cfg = cadence.load_config("sgd-logreg", BASE)
    cases = {
        "optimizer.lrr": ({"optimizer.lrr": [1, 2]}, "not a config key"),
        "low > 0": ({"optimizer.lr": {"low": 0, "high": 1, "log": True}}, "low > 0"),
        "low < high": ({"optimizer.lr": {"low": 1.0, "high": 0.1}}, "low < high"),
        "bad choice": ({"optimizer.name": ["sgd", "adamx"]}, "adamx"),
        "bad spec": ({"optimizer.lr": {"lo": 1}}, "unknown"),
        "empty": ({}, "non-empty"),
    }
    for space, message in cases.values():
        with pytest.raises(ConfigError, match=message):
            parse_space(space, cfg)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cadence")
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return args.func(args, Console(width=120))
    except ConfigError:
        return 2


def test_cli_commands_write_their_outputs(tmp_path):
    torch.set_num_threads(1)
    sets = [x for s in BASE for x in ("--set", s)]
    assert (
        _cli(["find-lr", "sgd-logreg", *sets, "--steps", "30", "--out", str(tmp_path / "fl")]) == 0
    )
    lr = json.loads((tmp_path / "fl" / "lr_find.json").read_text())
    assert lr["suggestion"] > 0 and (tmp_path / "fl" / "plots" / "lr_find.png").exists()
    out = tmp_path / "fb"
    assert _cli(["find-batch", "sgd-logreg", *sets, "--measurements", "5", "--out", str(out)]) == 0
    assert json.loads((out / "noise_scale.json").read_text())["measurements"] == 5

    # A search: section in the config, a named study, then resuming it with --study.
    config = {
        "workload": "logreg",
        "optimizer": {"name": "sgd", "lr": 0.1},
        "batch": {"size": 32},
        "train": {"max_steps": 20, "eval_every": 10, "progress": False},
        "search": {"optimizer.lr": {"low": "1e-3", "high": 1.0, "log": True}},
    }
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "tu"
    argv = ["tune", str(path), "--trials", "2", "--run-dir", str(run), "--study", "s1"]
    assert _cli(argv) == 0
    assert _cli(argv) == 0  # resumes: same storage (run/study.db), same study name
    data = json.loads((run / "tune.json").read_text())
    assert len(data["trials"]) == 4 and data["study_name"] == "s1"
    assert cadence.load_config(run / "best.yaml").workload == "logreg"
    # No search space anywhere: one line, exit 2, nothing half-done.
    assert _cli(["tune", "sgd-logreg", "--trials", "1", "--run-dir", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
