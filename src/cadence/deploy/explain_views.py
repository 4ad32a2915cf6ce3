"""How an explanation looks: a self-contained HTML page or a PNG, written whole or not at all.

The page carries everything inline (styles, and any picture as a data URI): no scripts and no
links, so it opens the same from a run directory copied anywhere, offline, and is safe to open
from someone else's run. Red is evidence for the explained output, blue against it; a colour's
strength is the attribution's size relative to the largest one.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from cadence.deploy.explain_result import Explanation, View
from cadence.io import atomic_path, atomic_write_text
from cadence.track.plots import pyplot

__all__ = ["FIGURES", "render_html", "render_png", "write_explanation"]

POSITIVE, NEGATIVE = (214, 39, 40), (31, 119, 180)  # matplotlib's red and blue, as RdBu shows

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }
.prompt { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9;
          border: 1px solid #ddd; padding: 1em; }
.prompt span { border-radius: 3px; padding: 0.1em 0; }
.prompt .next { outline: 2px dashed #888; margin-left: 0.3em; }
table { border-collapse: collapse; margin-top: 1em; }
td, th { padding: 0.2em 0.8em; text-align: left; border-bottom: 1px solid #eee; }
td.num { text-align: right; font-family: ui-monospace, monospace; }
img { max-width: 100%; }
.note { color: #555; }
"""


def write_explanation(expl: Explanation, path: str | Path) -> None:
    """An HTML page for ``.html``, else a PNG; the folder is made only now, when all is known."""
    path = Path(path)
    page = path.suffix.lower() == ".html"
    data = None if page else render_png(expl)  # rendered before anything touches the disk
    text = render_html(expl) if page else None
    path.parent.mkdir(parents=True, exist_ok=True)
    if text is not None:
        atomic_write_text(path, text)
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)  # type: ignore[arg-type]


def _rgba(value: float, scale: float) -> str:
    r, g, b = POSITIVE if value >= 0 else NEGATIVE
    alpha = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    return f"rgba({r}, {g}, {b}, {alpha:.3f})"


def _visible(token: str) -> str:
    """A token's text with its whitespace made visible, escaped for HTML."""
    text = html.escape(token).replace("\t", "\u21e5")
    return text.replace("\r", "\u240d").replace("\n", "\u23ce<br>")


def render_html(expl: Explanation) -> str:
    """The page: the summary, the shaded prompt (or the picture) and the table of top parts."""
    if expl.view is View.TOKENS:
        scale = float(np.abs(expl.attributions).max())
        spans = "".join(
            f'<span style="background: {_rgba(float(v), scale)}" title="{v:+.4g}">'
            f"{_visible(t)}</span>"
            for t, v in zip(expl.tokens, expl.attributions)
        )
        following = f'<span class="next" title="explained">{_visible(expl.target)}</span>'
        figure = f'<div class="prompt">{spans}{following}</div>'
        k = len(expl.tokens)
    else:
        png = base64.b64encode(render_png(expl)).decode("ascii")
        figure = f'<img alt="attributions" src="data:image/png;base64,{png}">'
        k = 10
    rows = "".join(
        f'<tr><td>{html.escape(name)}</td><td class="num">{v:+.4g}</td></tr>'
        for name, v in expl.top(k)
    )
    summary = "".join(f"<p>{html.escape(line)}</p>" for line in expl.summary())
    title = html.escape(f"Why {expl.target!r}")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>cadence explain: {title}</title><style>{STYLE}</style></head><body>"
        f"<h1>{title}</h1>{summary}{figure}"
        '<p class="note">Red: evidence for the explained output; blue: against it. '
        "Integrated gradients from the baseline to the input.</p>"
        f"<table><tr><th>part (largest first)</th><th>attribution</th></tr>{rows}</table>"
        "</body></html>\n"
    )


def _plain(text: str) -> str:
    """Text matplotlib shows as typed: a $ would otherwise start its math mode."""
    return text.replace("$", r"\$")


def _title(expl: Explanation) -> str:
    return _plain(
        f"explained {expl.target!r} (p = {expl.target_prob:.3f}); predicted "
        f"{expl.predicted!r} (p = {expl.predicted_prob:.3f})\n{expl.score_label}: "
        f"{expl.at_baseline:.3f} at the baseline -> {expl.at_input:.3f}; "
        f"{expl.steps} steps, delta {expl.delta:.2g}"
    )


def _signed(plt: Any, ax: Any, values: np.ndarray, **kwargs: Any) -> Any:
    """A heatmap of attributions, white at zero whatever their range."""
    m = float(np.abs(values).max()) or 1.0
    im = ax.imshow(values, cmap="RdBu_r", vmin=-m, vmax=m, **kwargs)
    plt.colorbar(im, ax=ax, label="attribution")
    return im


def _bars(plt: Any, expl: Explanation, labels: list[str]) -> Any:
    a = expl.attributions
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * a.size), 4.0))
    colors = ["#d62728" if v >= 0 else "#1f77b4" for v in a]
    ax.bar(np.arange(a.size), a, color=colors)
    ax.set_xticks(np.arange(a.size), [_plain(s) for s in labels], rotation=90, fontsize=8)
    ax.axhline(0.0, color="#444", linewidth=0.8)
    ax.set_ylabel("attribution")
    ax.set_title(_title(expl), fontsize=9)
    return fig


def _image(plt: Any, expl: Explanation) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 4.6), layout="constrained")
    left.imshow(expl.shown, cmap="gray")
    left.set_title("input")
    _signed(plt, right, expl.attributions)
    right.set_title("attribution per pixel")
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(_title(expl), fontsize=9)
    return fig


def _spectrogram(plt: Any, expl: Explanation) -> Any:
    mels, frames = expl.attributions.shape
    extent = (0.0, frames * expl.seconds_per_frame, 0.0, float(mels))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9.0, 6.5), sharex=True, layout="constrained")
    im = top.imshow(expl.shown, origin="lower", aspect="auto", extent=extent, cmap="magma")
    plt.colorbar(im, ax=top, label="log-mel energy")
    top.set_title("input (log-mel)")
    _signed(plt, bottom, expl.attributions, origin="lower", aspect="auto", extent=extent)
    bottom.set_title("attribution per time x mel region (normalised log-mel)")
    bottom.set_xlabel("time (s)")
    for ax in (top, bottom):
        ax.set_ylabel("mel bin")
    fig.suptitle(_title(expl), fontsize=9)
    return fig


def _token_bars(plt: Any, expl: Explanation) -> Any:
    return _bars(plt, expl, [repr(t)[1:-1].replace(" ", "\u2423")[:12] for t in expl.tokens])


def _feature_bars(plt: Any, expl: Explanation) -> Any:
    return _bars(plt, expl, [str(i) for i in range(expl.attributions.size)])


FIGURES = {
    View.TOKENS: _token_bars,
    View.FEATURES: _feature_bars,
    View.IMAGE: _image,
    View.SPECTROGRAM: _spectrogram,
}


def render_png(expl: Explanation) -> bytes:
    """The picture: bars per token or feature, heatmaps beside an image or a spectrogram."""
    plt = pyplot()
    fig = FIGURES[expl.view](plt, expl)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()
