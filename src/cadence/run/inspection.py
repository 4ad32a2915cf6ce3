"""``cadence inspect RUN_DIR``: inspect.html and its figures, from the run's own files.

One page answers "why did my run do that?": the account (account.py) on top, then the loss with
every spike and rollback marked, the LR and batch size, a heatmap of each layer's update ratio
over the run, activation and gradient norms by depth, sharpness against the optimizer's
stability threshold and the noise scale. Figures a run did not record (no ``inspect_every``, no
``sharpness_every``) are left out and the account says which key would add them.

Like the compare report, the page embeds every figure as a base64 PNG and has no scripts or
external links: it renders offline and can be attached anywhere. The PNGs are also written to
``RUN_DIR/inspect/``.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cadence.io import atomic_path, atomic_write_text
from cadence.run.account import RunRecords, account
from cadence.track.plots import pyplot


def _finite(values: list[Any]) -> bool:
    return any(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _loss(rec: RunRecords, ax: Any) -> bool:
    rows = rec.rows
    for key, style in (("train_loss", {}), ("val_loss", {"marker": "o", "ms": 3})):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=key, **style)
    for i, e in enumerate(rec.spikes):
        label = "spike" if i == 0 else None
        ax.axvline(e["step"], color="red", alpha=0.5, lw=1, label=label)
        if e["action"] == "rollback":
            ax.axvspan(e["rolled_back_to"], e["step"], color="red", alpha=0.08)
    ax.set_ylabel("loss")
    losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
    finite = [v for v in losses if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) > 20 * min(finite):  # decades apart
        ax.set_yscale("log")
    return True


def _lr(rec: RunRecords, ax: Any) -> bool:
    pts = [(r["step"], r["lr"]) for r in rec.rows if r.get("lr") is not None]
    ax.plot(*zip(*pts), label="lr")
    ax.set_ylabel("learning rate")
    sizes = [(r["step"], r["batch_size"]) for r in rec.rows if r.get("batch_size")]
    if len({b for _, b in sizes}) > 1:
        twin = ax.twinx()
        twin.step(*zip(*sizes), where="post", color="C1", label="batch size")
        twin.set_ylabel("batch size")
    return True


def _layer_names(rec: RunRecords) -> list[str]:
    names: list[str] = []
    for r in rec.layers:
        names += [n for n in r["layers"] if n not in names]
    return names


def _heatmap(rec: RunRecords, ax: Any) -> bool:
    if not rec.layers:
        return False
    names = _layer_names(rec)
    grid = [
        [
            math.log10(v)
            if (v := r["layers"].get(n, {}).get("update_ratio")) and v > 0 and math.isfinite(v)
            else math.nan
            for r in rec.layers
        ]
        for n in names
    ]
    steps = [r["step"] for r in rec.layers]
    im = ax.imshow(
        grid,
        aspect="auto",
        interpolation="nearest",
        cmap="magma",
        extent=(steps[0], steps[-1], len(names) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.figure.colorbar(im, ax=ax, label="log10 update ratio")
    for e in rec.spikes:
        ax.axvline(e["step"], color="cyan", lw=1)
    return True


def _depth(rec: RunRecords, ax: Any) -> bool:
    if not rec.layers:
        return False
    names = _layer_names(rec)
    picks = sorted({0, len(rec.layers) // 2, len(rec.layers) - 1})
    for i in picks:
        r = rec.layers[i]
        for stat, style in (("act_rms", "-"), ("grad_norm", "--")):
            ys = [r["layers"].get(n, {}).get(stat, math.nan) for n in names]
            if _finite(ys):
                ax.plot(range(len(names)), ys, style, marker=".", label=f"{stat}, step {r['step']}")
    ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7, ha="right")
    ax.set_yscale("log")
    return True


def _sharp(rec: RunRecords, ax: Any) -> bool:
    rows = [r for r in rec.rows if r.get("sharpness") is not None]
    if not rows:
        return False
    for key in ("sharpness", "precond_sharpness", "sharpness_threshold"):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and r[key] > 0]
        if pts:
            style = "--" if key == "sharpness_threshold" else "-"
            ax.plot(*zip(*pts), style, marker=".", label=key)
    ax.set_yscale("log")
    return True


def _noise(rec: RunRecords, ax: Any) -> bool:
    pts = [(r["step"], r["noise_scale"]) for r in rec.rows if r.get("noise_scale") is not None]
    if not pts:
        return False
    ax.plot(*zip(*pts), marker=".", label="critical batch (noise scale)")
    ax.set_ylabel("samples")
    return True


FIGURES: list[tuple[str, str, Callable[[RunRecords, Any], bool]]] = [
    ("loss", "Loss, spikes (red lines) and rollbacks (shaded)", _loss),
    ("lr", "Learning rate and batch size", _lr),
    ("update_ratio", "Update ratio per layer over the run", _heatmap),
    ("depth", "Activation RMS and gradient norm by depth", _depth),
    ("sharpness", "Sharpness against the stability threshold", _sharp),
    ("noise_scale", "Gradient noise scale", _noise),
]


def write_inspection(run_dir: Path) -> tuple[Path, list[str]]:
    """Write ``RUN_DIR/inspect.html`` and ``RUN_DIR/inspect/*.png``; (the page, the account)."""
    rec = RunRecords.read(run_dir)
    lines = account(rec)
    out = rec.run_dir / "inspect"
    out.mkdir(exist_ok=True)
    plt = pyplot()
    figures = []
    for name, title, draw in FIGURES:
        fig, ax = plt.subplots(figsize=(10, 3.6))
        if not draw(rec, ax):
            plt.close(fig)
            continue
        ax.set_title(title)
        if name != "depth":
            ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
        path = out / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        figures.append((title, path))
    page = rec.run_dir / "inspect.html"
    atomic_write_text(page, _html(rec, lines, figures))
    return page, lines


def _html(rec: RunRecords, lines: list[str], figures: list[tuple[str, Path]]) -> str:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    imgs = "".join(
        f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;"
        f"base64,{base64.b64encode(path.read_bytes()).decode()}'>"
        for title, path in figures
    )
    name = html.escape(rec.run_dir.name)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>cadence inspect: {name}</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "img{max-width:100%}li{margin:.3em 0}</style></head><body>"
        f"<h1>What run {name} did, and why</h1><ul class='account'>{items}</ul>{imgs}"
        "</body></html>\n"
    )
