"""PNG plots of a run: loss and LR against steps and against samples (or tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cadence.io import atomic_path


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, imported at the first plot: its import
    costs most of a second, which runs that write no plot (and ``cadence --help``) need not pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in rows if r.get(y) is not None and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def plot_run(rows: list[dict[str, Any]], out_dir: Path, title: str = "") -> list[Path]:
    """Write loss.png and lr.png; each has a panel against steps and one against samples/tokens."""
    out_dir.mkdir(parents=True, exist_ok=True)
    xs = [
        ("step", "optimizer steps"),
        ("tokens" if rows and "tokens" in rows[0] else "samples", ""),
    ]
    written = []
    plt = pyplot()
    for name, keys, ylabel, logy in (
        ("loss.png", ("train_loss", "val_loss"), "loss", True),
        ("lr.png", ("lr", "batch_size"), "learning rate / batch size", False),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, (x, label) in zip(axes, xs):
            for key in keys:
                px, py = _series(rows, x, key)
                if not px:
                    continue
                target = ax.twinx() if key == "batch_size" else ax
                style = {"marker": "o", "ms": 3} if key == "val_loss" else {}
                target.plot(px, py, label=key, **style, color="C1" if key != keys[0] else "C0")
                target.set_ylabel(key if key == "batch_size" else ylabel)
                if logy and min(py) > 0:
                    target.set_yscale("log")
            ax.set_xlabel(label or f"{x} seen")
            ax.grid(alpha=0.3)
            ax.legend(loc="upper right")
        fig.suptitle(title)
        _save(fig, out_dir / name)
        written.append(out_dir / name)
    return written
