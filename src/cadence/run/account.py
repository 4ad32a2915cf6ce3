"""A run's story in plain language: what it did and, where the records say, why.

``cadence inspect`` prints these lines and puts them at the top of ``inspect.html``. Each line
is derived from the run's own files (metrics rows, ``inspect.jsonl``, ``summary.json``), never
from a guess: a sentence about layers needs ``train.inspect_every``, one about the stability
edge needs ``train.sharpness_every``, and a run without them is told which key would add it.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cadence.config import ConfigError
from cadence.track.metrics import read_metrics
from cadence.training.spikes import describe_spike

SHOWN_SPIKES = 5  # spikes told one by one; the rest are counted
EDGE = 0.9  # sharpness at this share of the threshold counts as at the edge of stability


@dataclass
class RunRecords:
    """What a run directory holds for inspection."""

    run_dir: Path
    rows: list[dict[str, Any]]
    layers: list[dict[str, Any]] = field(default_factory=list)  # inspect.jsonl
    summary: dict[str, Any] | None = None  # None: the run has not finished (or crashed)

    @classmethod
    def read(cls, run_dir: Path) -> RunRecords:
        run_dir = Path(run_dir)
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            raise ConfigError(
                f"cadence inspect: {run_dir} holds no metrics.jsonl; give a run directory "
                "(cadence train --run-dir DIR writes one)"
            )
        rows = read_metrics(metrics)
        if not rows:
            raise ConfigError(f"cadence inspect: {metrics} is empty; the run logged no step yet")
        layers = read_metrics(run_dir / "inspect.jsonl")
        path = run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else None
        return cls(run_dir, rows, layers, summary)

    @property
    def spikes(self) -> list[dict[str, Any]]:
        return (self.summary or {}).get("spikes") or []


def _n(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def account(rec: RunRecords) -> list[str]:
    """The lines of the account, in the order a reader asks: how it ended, what the schedule
    did, what went wrong and where, and what the measurements say about the LR."""
    return [
        line
        for part in (_ending, _schedule, _trouble, _layers, _sharpness, _noise)
        for line in part(rec)
    ]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _ending(rec: RunRecords) -> list[str]:
    last = rec.rows[-1]
    s = rec.summary
    if s is None:
        return [f"The run has not finished: its last row is step {last['step']:,}."]
    spent = f"{s['tokens']:,} tokens" if s.get("tokens") else f"{s['samples']:,} samples"
    line = (
        f"Stopped at step {s['steps']:,} ({s['stop_reason']}) after {spent} and "
        f"{s['wall_time_s']:.0f} s."
    )
    if s.get("best_metric") is not None:
        line += f" Best {s['metric']}: {_n(s['best_metric'])} at step {s['best_step']:,}."
    if s.get("target") is not None:
        at = s.get("target_step")
        line += f" Target {s['target']}: " + (f"reached at step {at:,}." if at else "not reached.")
    return [line]


def _schedule(rec: RunRecords) -> list[str]:
    lrs = [(r["step"], r["lr"]) for r in rec.rows if r.get("lr") is not None]
    out = []
    if lrs:
        peak_step, peak = max(lrs, key=lambda p: p[1])
        line = f"The LR peaked at {peak:.3g} (step {peak_step:,})"
        end = lrs[-1][1]
        if end < peak:
            share = f"{end / peak:.0%}" if end >= 0.01 * peak else "under 1%"
            line += f" and ended at {end:.3g} ({share} of the peak)"
        out.append(line + ".")
    sizes = [(r["step"], r["batch_size"]) for r in rec.rows if r.get("batch_size")]
    changes = [(b, a) for a, b in zip(sizes, sizes[1:]) if a[1] != b[1]]
    for (step, size), (_, before) in changes[:5]:
        out.append(f"Step {step:,}: the batch went from {before:,} to {size:,} samples.")
    return out


def _trouble(rec: RunRecords) -> list[str]:
    spikes = rec.spikes
    out = [_sentence(describe_spike(e)) for e in spikes[:SHOWN_SPIKES]]
    if len(spikes) > SHOWN_SPIKES:
        counts = ", ".join(
            f"{sum(e['action'] == a for e in spikes)} {a}"
            for a in sorted({e["action"] for e in spikes})
        )
        out.append(f"... {len(spikes):,} spikes in all ({counts}); summary.json lists each.")

    last = rec.rows[-1]
    if last.get("skipped_steps"):
        spikes = sum(1 for e in rec.spikes if e["action"] == "skip")
        other = last["skipped_steps"] - spikes
        if other > 0:
            out.append(f"{other} step(s) had a non-finite loss or gradient; no update applied.")
    if last.get("rollbacks") and not any(e["action"] == "rollback" for e in rec.spikes):
        out.append(f"{last['rollbacks']} rollback(s) to a checkpoint after non-finite steps.")
    if not out and (rec.summary or {}).get("spikes") == []:
        out.append("No loss spike (train.on_spike watched every step).")
    return out


def _layers(rec: RunRecords) -> list[str]:
    if not rec.layers:
        return ["Per-layer health was not recorded (set train.inspect_every to see it)."]
    ratios: dict[str, list[float]] = {}
    for r in rec.layers:
        for layer, stats in r["layers"].items():
            value = stats.get("update_ratio")
            if value is not None and math.isfinite(value):
                ratios.setdefault(layer, []).append(value)
    medians = {k: statistics.median(v) for k, v in ratios.items() if v}
    out = []
    if medians:
        hi = max(medians, key=medians.__getitem__)
        lo = min(medians, key=medians.__getitem__)
        out.append(
            f"Update ratios (|Δw|/|w| per step, median over {len(rec.layers)} inspections): "
            f"largest {hi} ({medians[hi]:.2g}), smallest {lo} ({medians[lo]:.2g})."
        )
    entropy = _entropy_trend(rec)
    return out + ([entropy] if entropy else [])


def _entropy_trend(rec: RunRecords) -> str | None:
    """The attention layer whose entropy fell most between the first and last inspection:
    heads collapsing onto few tokens is a known precursor of instability."""
    first, last = rec.layers[0]["layers"], rec.layers[-1]["layers"]
    falls = {
        layer: (first[layer]["attn_entropy"], stats["attn_entropy"])
        for layer, stats in last.items()
        if "attn_entropy" in stats and "attn_entropy" in first.get(layer, {})
    }
    if not falls:
        return None
    layer = min(falls, key=lambda k: falls[k][1] - falls[k][0])
    a, b = falls[layer]
    return (
        f"Attention entropy of {layer} went from {a:.2f} to {b:.2f} nats (of the attention "
        "layers, the largest fall: heads attending to fewer tokens)."
    )


def _sharpness(rec: RunRecords) -> list[str]:
    pts = [r for r in rec.rows if r.get("sharpness") is not None]
    if not pts:
        return ["Sharpness was not measured (set train.sharpness_every to see it)."]
    key = "precond_sharpness" if any("precond_sharpness" in r for r in pts) else "sharpness"
    with_edge = [r for r in pts if r.get("sharpness_threshold") and r.get(key) is not None]
    if not with_edge:
        top = max(r["sharpness"] for r in pts)
        return [f"Sharpness peaked at {top:.3g}; this optimizer has no known stability edge."]
    shares = [(r[key] / r["sharpness_threshold"], r["step"]) for r in with_edge]
    share, step = max(shares)
    name = "preconditioned sharpness" if key == "precond_sharpness" else "sharpness"
    if share >= EDGE:
        return [
            f"The {name} reached {share:.0%} of the optimizer's stability threshold at step "
            f"{step:,}: the run trained at the edge of stability, where the LR, not the loss, "
            "sets the pace; a higher LR would not be stable."
        ]
    return [
        f"The {name} stayed below {share:.0%} of the optimizer's stability threshold (highest "
        f"at step {step:,}): the LR was not at its stability limit."
    ]


def _noise(rec: RunRecords) -> list[str]:
    pts = [(r["step"], r["noise_scale"]) for r in rec.rows if r.get("noise_scale") is not None]
    if len(pts) < 2:
        return []
    (s0, b0), (s1, b1) = pts[0], pts[-1]
    return [
        f"The critical batch (gradient noise scale) went from {_n(b0)} at step {s0:,} to "
        f"{_n(b1)} samples at step {s1:,}."
    ]
