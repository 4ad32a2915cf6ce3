"""Reports of a comparison: report.md, a self-contained report.html, and the plots as PNG.

The HTML embeds every plot as a base64 PNG and has no scripts or external links, so it can be
mailed or attached to a CI run and still render anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cadence.io import atomic_write_text  # noqa: E402

__all__ = ["write_reports"]


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "∞"
    if unit == "s":
        return f"{value:.1f}s" if abs(value) >= 10 else f"{value:.3g}s"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _stat(stats: dict[str, float] | None, unit: str = "") -> str:
    """'median [lo, hi]'; the interval is left out when it is a single point."""
    if not stats:
        return "-"
    med = _fmt(stats["median"], unit)
    if stats["lo"] == stats["hi"]:
        return med
    return f"{med} [{_fmt(stats['lo'], unit)}, {_fmt(stats['hi'], unit)}]"


def _unit_key(results: dict[str, Any], workload: str) -> str:
    return "tokens" if results["workloads"][workload]["workload"] == "lm" else "samples"


def _params_text(params: dict[str, Any]) -> str:
    if not params:
        return "-"
    return ", ".join(
        f"{k.split('.')[-1]}={_fmt(v) if isinstance(v, float) else v}" for k, v in params.items()
    )


def _params_range(studies: list[dict[str, Any]]) -> str:
    """The span of each numeric hyper-parameter over the study winners: how sharp the optimum."""
    spans = []
    for k in dict.fromkeys(k for p in studies for k in p):
        vals = [p[k] for p in studies if isinstance(p.get(k), (int, float))]
        if len(vals) > 1 and min(vals) != max(vals):
            spans.append(f"{k.split('.')[-1]} {_fmt(min(vals))}–{_fmt(max(vals))}")
    return f" (studies: {', '.join(spans)})" if spans else ""


def _table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "workload",
        "strategy",
        "reached",
        "steps to target",
        "samples/tokens to target",
        "CPU time to target",
        "wall time to target",
        "final metric",
        "best metric",
    ]
    external = results.get("ruleset") == "external"
    if external:
        header.append("winner of the fastest study")
    rows = []
    for r in results["table"]:
        unit = _unit_key(results, r["workload"])
        row = [
            r["workload"],
            r["strategy"],
            f"{r['reached']}/{r['runs']}",
            _stat(r["steps_to_target"]),
            _stat(r[f"{unit}_to_target"]) + (" tok" if unit == "tokens" else ""),
            _stat(r.get("cpu_to_target"), "s"),
            _stat(r["time_to_target"], "s"),
            _stat(r["final_metric"]),
            _stat(r["best_metric"]),
        ]
        if external:
            row.append(_params_text(r["params"]) + _params_range(r.get("study_params") or []))
        rows.append(row)
    return header, rows


def _score_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    measures = list(results["profiles"])
    header = ["strategy", *(f"score ({m})" for m in measures)]
    by = results["profile_by"]
    order = sorted(results["strategies"], key=lambda s: -results["profiles"][by]["score"][s])
    rows = [[s, *(f"{results['profiles'][m]['score'][s]:.3f}" for m in measures)] for s in order]
    return header, rows


def _significance_lines(results: dict[str, Any]) -> list[str]:
    """One line per workload: is the winner's lead over the runner-up more than noise?"""
    lines = []
    for w, t in (results.get("significance") or {}).items():
        parts = []
        for m, res in t.items():
            if m in ("a", "b", "seeds"):
                continue
            unit = "s" if m in ("cpu", "time") else ""
            if res["test"] == "too few studies":
                parts.append(f"{m}: one study, no test")
                continue
            text = f"{m}: {res['test']}"
            if res["mean_diff"] is not None:
                lo, hi = res["ci"]
                text += (
                    f", mean difference {_fmt(res['mean_diff'], unit)}"
                    f" [{_fmt(lo, unit)}, {_fmt(hi, unit)}]"
                )
            else:
                text += f", first in {res['wins_a']} of {res['n']} pairs ({res['wins_b']} lost)"
            verdict = "significant" if res["significant"] else "not significant: noise"
            text += f", p = {res['p']:.3g} ({verdict})"
            parts.append(text)
        n = len(t["seeds"])
        lines.append(f"{w}: {t['a']} vs {t['b']} over {n} paired studies; " + "; ".join(parts))
    return lines


def _miss_lines(results: dict[str, Any]) -> list[str]:
    """Each strategy x workload with a study that missed: why, per missed study."""
    lines = []
    for r in results["table"]:
        if r["reached"] == r["runs"]:
            continue
        why = [
            f"study {x['seed']}: {x.get('miss') or x.get('error') or 'missed'}"
            for x in results["runs"]
            if (x["strategy"], x["workload"]) == (r["strategy"], r["workload"]) and not x["reached"]
        ]
        lines.append(f"{r['workload']} / {r['strategy']}: " + "; ".join(why))
    return lines or ["every study of every strategy reached its target"]


def _winner_lines(results: dict[str, Any]) -> list[str]:
    by = results["profile_by"]
    unit = {"cpu": "s", "time": "s", "steps": "", "samples": ""}[by]
    lines = []
    for w, info in results["winners"].items():
        target = results["workloads"][w]["target"]
        if info["best"] is None:
            lines.append(f"{w} (target {target:g}): no strategy reached the target")
            continue
        text = f"{w} (target {target:g}): {info['best']} first ({_fmt(info['value'], unit)} {by})"
        if info["runner_up"]:
            text += f", {info['factor']:.2f}x ahead of {info['runner_up']}"
        lines.append(text)
    return lines


# ---------------------------------------------------------------- plots


def _rows_of(run_dir: str) -> list[dict[str, Any]]:
    from cadence.track.metrics import read_metrics

    return read_metrics(Path(run_dir) / "metrics.jsonl")


def _series(rows: Sequence[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    if x == "train_time_s" and rows and "train_time_s" not in rows[0]:
        x = "time_s"  # runs written before train_time_s existed
    pts = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes. Its callers lay it out with tight_layout, so the save does not
    ask for bbox_inches="tight" too: that draws the whole figure once more only to crop a
    margin tight_layout has already trimmed (a sixth of the report's drawing time)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def plot_workload(results: dict[str, Any], workload: str) -> bytes:
    """Six panels, every run of every strategy overlaid (one colour per strategy, one line per
    seed): training loss and the validation metric against steps and training time, LR and
    batch."""
    info = results["workloads"][workload]
    runs = [r for r in results["runs"] if r["workload"] == workload]
    strategies = list(dict.fromkeys(r["strategy"] for r in runs))
    colours = plt.get_cmap("tab20" if len(strategies) > 10 else "tab10")
    metric = next((r.get("metric") for r in runs if r.get("metric")), "val_loss")
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    panels = [
        (axes[0, 0], "step", "train_loss", "train loss vs steps", True),
        (axes[0, 1], "train_time_s", "train_loss", "train loss vs training time (s)", True),
        (axes[0, 2], "step", metric, f"{metric} vs steps", metric != "val_accuracy"),
        (
            axes[1, 0],
            "train_time_s",
            metric,
            f"{metric} vs training time (s)",
            metric != "val_accuracy",
        ),
        (axes[1, 1], "step", "lr", "learning rate vs steps", True),
        (axes[1, 2], "step", "batch_size", "batch size vs steps", False),
    ]
    for i, s in enumerate(strategies):
        colour = colours(i % colours.N)
        for j, run in enumerate(r for r in runs if r["strategy"] == s):
            rows = _rows_of(run["run_dir"])
            for ax, x, y, _, _ in panels:
                xs, ys = _series(rows, x, y)
                if y == "lr":
                    ys = [v if v > 0 else float("nan") for v in ys]
                if xs:
                    ax.plot(xs, ys, color=colour, lw=1.2, alpha=0.85, label=s if j == 0 else None)
    for ax, _, y, title, logy in panels:
        ax.set_title(title, fontsize=10)
        if logy and ax.lines:
            ax.set_yscale("log")
        if y == metric:
            ax.axhline(info["target"], color="k", ls="--", lw=1, label="target")
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles2, labels2 = axes[0, 2].get_legend_handles_labels()
    for h, lab in zip(handles2, labels2):
        if lab == "target":
            handles.append(h)
            labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels) or 1), fontsize=9)
    fig.suptitle(f"{workload} ({info['workload']}): target {metric} {info['target']:g}")
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    return _png(fig)


def plot_profiles(results: dict[str, Any]) -> bytes:
    """rho_s(tau) for every strategy on the primary measure, with the score in the legend."""
    by = results["profile_by"]
    prof = results["profiles"][by]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colours = plt.get_cmap("tab20" if len(prof["rho"]) > 10 else "tab10")
    order = sorted(prof["rho"], key=lambda s: -prof["score"][s])
    for i, s in enumerate(order):
        ax.step(
            prof["taus"],
            prof["rho"][s],
            where="post",
            color=colours(i % colours.N),
            lw=1.6,
            label=f"{s} (score {prof['score'][s]:.3f})",
        )
    ax.axvline(results["tau_max"], color="k", ls=":", lw=1)
    ax.set_xlabel(f"τ (within a factor τ of the best {by}-to-target)")
    ax.set_ylabel("fraction of workloads")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(
        f"performance profiles ({by} to target; score = area up to τ={results['tau_max']:g})"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------- documents


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _intro(results: dict[str, Any]) -> list[str]:
    hw = results["hardware"]
    c = results["counts"]
    return [
        f"Spec `{results['spec']}`: {results['description']}".rstrip(": "),
        f"{len(results['strategies'])} strategies x {len(results['workloads'])} workloads x "
        f"{len(results['seeds'])} seeds; {c['ran']} runs trained now, {c['skipped']} reused, "
        f"{c['failed']} failed; {results['elapsed_s']:.0f}s with --jobs {results['jobs']} on "
        f"{hw['cpu']} ({hw['cores']} cores), torch {hw['torch']}.",
        _ruleset_text(results),
        "Times to target are medians over studies (seeds) with a 95% bootstrap interval in "
        "brackets; a run that misses its target counts as ∞ (AlgoPerf). Both times count "
        "training only (evaluations and checkpoints are left out).",
        "Why CPU time is the primary time: wall time on a shared machine measures the "
        "neighbours (two runs that reached a target at the same step once took 28.9 s and "
        "14.1 s). Every run trains with one thread, and the process's CPU clock does not run "
        "while it waits for a core, so its CPU time to target stays put when parallel runs or "
        "other processes load the machine. A per-step cost calibrated in isolation was the "
        "alternative; it needs a calibration run per strategy and workload and misses "
        "strategies whose steps change cost (batch ramps, plateau evaluations), while CPU "
        "time is measured on the run itself. Wall time stays as a secondary column.",
    ]


def _ruleset_text(results: dict[str, Any]) -> str:
    ruleset = results.get("ruleset", "grid")
    n = len(results["seeds"])
    if ruleset == "external":
        k = results["trials_per_study"]
        fewer = {w: e["trials"] for w, e in results["workloads"].items() if e.get("trials", k) != k}
        except_text = (
            " (on "
            + ", ".join(f"{w}: {t}" for w, t in fewer.items())
            + ", the same for every strategy there)"
            if fewer
            else ""
        )
        return (
            f"Ruleset external (AlgoPerf external tuning): every strategy with a search space "
            f"gets {k} quasi-random trials per study from it{except_text}, in {n} "
            "independent studies (study i trains with seed i and draws its own points); a "
            "study's result is its fastest trial, a strategy's the median over studies. A "
            "strategy without a space runs once per study (self-tuned)."
        )
    if ruleset == "self":
        return (
            f"Ruleset self: no tuning; every strategy runs at its own settings in {n} studies "
            "(seeds)."
        )
    return "Ruleset grid: each tune grid is run on the first seed, the fastest point on all."


def _workload_lines(results: dict[str, Any]) -> list[str]:
    return [
        f"{w}: workload {i['workload']}, target {i['target']:g}, budget {i['max_steps']} steps"
        + (f" / {i['max_time_s']:g}s" if i["max_time_s"] else "")
        for w, i in results["workloads"].items()
    ]


def _strategy_lines(results: dict[str, Any]) -> list[str]:
    out = []
    for s, info in results["strategies"].items():
        line = f"{s}: {info['config']}"
        if info["description"]:
            line += f" — {info['description']}"
        if info.get("search"):
            line += f" (searched: {'; '.join(info['search'])})"
        tuned = results["tuning"].get(s)
        if tuned:
            picks = "; ".join(f"{w}: {v['chosen']}" for w, v in tuned.items())
            line += f" (tuned over {len(info['trials'])} points; chosen {picks})"
        out.append(line)
    return out


def write_reports(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write report.md (+ plots/*.png it links) and report.html (plots embedded)."""
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, str, bytes]] = []
    for w in results["workloads"]:
        images.append((f"curves-{w}.png", f"{w}: curves", plot_workload(results, w)))
    images.append(("profiles.png", "performance profiles", plot_profiles(results)))
    for name, _, data in images:
        (plots_dir / name).write_bytes(data)

    table = _table_rows(results)
    scores = _score_rows(results)
    winners = _winner_lines(results)
    intro = _intro(results)

    md = [f"# Comparison: {results['spec']}", "", *(f"{line}\n" for line in intro)]
    md += ["## Workloads", "", *(f"- {line}" for line in _workload_lines(results)), ""]
    md += ["## Strategies", "", *(f"- {line}" for line in _strategy_lines(results)), ""]
    md += ["## Who reaches the target first", "", *(f"- {line}" for line in winners), ""]
    significance = _significance_lines(results)
    md += ["## Time to target", "", _md_table(*table), ""]
    md += ["## Is the lead more than noise?", "", *(f"- {line}" for line in significance), ""]
    misses = _miss_lines(results)
    md += ["## Why the misses missed: budget or method", "", *(f"- {line}" for line in misses)]
    md += [""]
    md += [
        f"## Performance profiles (primary measure: {results['profile_by']})",
        "",
        _md_table(*scores),
        "",
    ]
    md += [f"![{alt}](plots/{name})\n" for name, alt, _ in images]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")

    def li(lines: list[str]) -> str:
        return "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>"

    figs = "".join(
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"><figcaption>{html.escape(alt)}</figcaption></figure>'
        for _, alt, data in images
    )
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}"
        "img{max-width:100%;border:1px solid #eee}figure{margin:1.5em 0}"
    )
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>cadence compare: {html.escape(results['spec'])}</title><style>{style}</style>"
        f"</head><body><h1>Comparison: {html.escape(results['spec'])}</h1>"
        + "".join(f"<p>{html.escape(x)}</p>" for x in intro)
        + "<h2>Workloads</h2>"
        + li(_workload_lines(results))
        + "<h2>Strategies</h2>"
        + li(_strategy_lines(results))
        + "<h2>Who reaches the target first</h2>"
        + li(winners)
        + "<h2>Time to target</h2>"
        + _html_table(*table)
        + "<h2>Is the lead more than noise?</h2>"
        + li(significance)
        + "<h2>Why the misses missed: budget or method</h2>"
        + li(misses)
        + f"<h2>Performance profiles (primary measure: {html.escape(results['profile_by'])})</h2>"
        + _html_table(*scores)
        + figs
        + "</body></html>\n"
    )
    atomic_write_text(out / "report.html", page)
    return {"md": out / "report.md", "html": out / "report.html", "plots": plots_dir}
