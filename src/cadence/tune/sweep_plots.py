"""Plots of an Optuna study: optimisation history, validation curves, parameter importances.

Kept apart from the sweep itself so that running trials does not import matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

if TYPE_CHECKING:
    from cadence.tune.sweep import TuneResult


def plot_study(result: TuneResult, study: optuna.Study, out: Path) -> list[Path]:
    """history.png (each trial, best so far, pruned ones marked), curves.png (intermediate
    values: where pruning cut trials) and importance.png (fANOVA; needs >= 2 complete trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cadence.io import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig: Any, name: str) -> None:
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(out / name)

    rows = result.trials
    maximize = result.direction == "maximize"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in rows if r["state"] == "COMPLETE"]
    pruned = [r for r in rows if r["state"] == "PRUNED" and r["intermediate"]]
    ax.plot(
        [r["number"] for r in done], [r["value"] for r in done], "o", color="C0", label="complete"
    )
    if pruned:
        last = [r["intermediate"][max(r["intermediate"])] for r in pruned]
        ax.plot([r["number"] for r in pruned], last, "x", color="C3", label="pruned (last report)")
    best, xs, ys = None, [], []
    for r in done:
        v = r["value"]
        if best is None or (v > best if maximize else v < best):
            best = v
        xs.append(r["number"])
        ys.append(best)
    ax.step(xs, ys, where="post", color="k", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(result.metric)
    if done and all(r["value"] > 0 for r in done):
        ax.set_yscale("log")
    ax.set_title(f"optimisation history · {result.study_name}")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    save(fig, "history.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["intermediate"]:
            steps = sorted(r["intermediate"])
            color = "C3" if r["state"] == "PRUNED" else "C0"
            ax.plot(steps, [r["intermediate"][s] for s in steps], "-", color=color, alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel(result.metric)
    ax.set_title("validation curves (red: pruned)")
    ax.grid(True, alpha=0.3)
    save(fig, "curves.png")

    importances = param_importances(study)
    if importances:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(importances)))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="C0")
        ax.set_xlabel("importance (fANOVA)")
        ax.set_title("parameter importances")
        save(fig, "importance.png")
    return written


def param_importances(study: optuna.Study) -> dict[str, float]:
    """fANOVA importances, or {} when there are too few complete trials or only one parameter
    varies (Optuna raises then; a missing plot is better than a failed sweep)."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError):
        return {}
