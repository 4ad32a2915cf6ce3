"""Loss spikes: what counts as one, and which layer to look at first.

A spike is a training loss far above the run's recent level. The level and the spread are the
median and the MAD (median absolute deviation) of the last ``train.spike_window`` losses, not
the mean and standard deviation: one bad batch moves a mean and inflates a deviation, so a mean
test would hide the second spike behind the first, while the median and MAD barely notice
either. A robust z-score of ``train.spike_z`` (6 by default) is far outside what mini-batch
noise gives (a normal distribution puts one draw in a billion there).

The policies (``warn``, ``skip``, ``rollback``) are applied by the trainer (guards.py); the
functions here are pure, so a custom loop can call them too.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

MAD_TO_SIGMA = 1.4826  # MAD x this = the standard deviation, for normally distributed noise
MIN_HISTORY = 20  # losses needed before anything is called a spike (or the whole window)
RISE_FACTOR = 2.0  # a layer's update ratio this far above its median has "risen"
RECENT = 3  # the inspection records before a spike in which a rise is looked for


def robust_z(history: Sequence[float], loss: float, window: int) -> tuple[float, float] | None:
    """(z, median) of ``loss`` against the last ``window`` losses of ``history``; None while
    there are too few to say. A spread of zero (a loss that has not moved) is floored at a
    thousandth of the median, so a flat loss does not make every wobble a spike."""
    recent = list(history[-window:])
    if len(recent) < min(MIN_HISTORY, window):
        return None
    median = statistics.median(recent)
    mad = statistics.median(abs(x - median) for x in recent)
    spread = max(MAD_TO_SIGMA * mad, 1e-3 * abs(median), 1e-12)
    return (loss - median) / spread, median


def rose_first(
    history: Sequence[dict[str, Any]], factor: float = RISE_FACTOR, recent: int = RECENT
) -> tuple[str, int, float] | None:
    """From per-layer records (``inspect.jsonl``'s, oldest first): the layer whose update ratio
    rose ``factor`` times above its own median in the last ``recent`` records, the first to do
    so, with the step and the multiple. The median is taken over the records before those (the
    run's baseline: early steps, whose updates are large for every layer, weigh as little as
    any). None when none rose, or there are too few records to have a baseline."""
    if len(history) < recent + 3:
        return None
    base, window = history[:-recent], history[-recent:]
    medians: dict[str, float] = {}
    for layer in window[-1]["layers"]:
        values = [r["layers"][layer]["update_ratio"] for r in base if layer in r["layers"]]
        values = [v for v in values if v is not None and math.isfinite(v)]
        if values:
            medians[layer] = statistics.median(values)
    for record in window:
        risen = [
            (stats["update_ratio"] / medians[layer], layer)
            for layer, stats in record["layers"].items()
            if medians.get(layer, 0) > 0
            and stats.get("update_ratio") is not None
            and stats["update_ratio"] > factor * medians[layer]
        ]
        if risen:
            multiple, layer = max(risen)
            return layer, record["step"], multiple
    return None


def largest_rise(
    ratios: dict[str, float], baseline: dict[str, float] | None = None
) -> tuple[str, float] | None:
    """The layer whose gradient-to-weight ratio at the spike stands out most: against its
    baseline (the ratio's median over the inspection records) where one is known, as is
    otherwise. Returns the layer and the multiple of its baseline (or the raw ratio)."""
    scored = {
        layer: r / baseline[layer] if baseline and baseline.get(layer) else r
        for layer, r in ratios.items()
        if r == r  # not NaN
    }
    if not scored:
        return None
    layer = max(scored, key=scored.__getitem__)
    return layer, scored[layer]


def blame(history: Sequence[dict[str, Any]], ratios: dict[str, float]) -> tuple[str | None, str]:
    """The layer a spike's account names, and why: the first whose update ratio rose before
    the spike (needs ``train.inspect_every``), else the one whose gradient stood out most at
    it."""
    first = rose_first(history)
    if first is not None:
        layer, step, multiple = first
        return layer, f"update ratio rose first (step {step:,}: {multiple:.1f}x its median)"
    baseline = None
    if history:
        baseline = {}
        for layer in ratios:
            values = [
                r["layers"][layer]["grad_norm"] / r["layers"][layer]["weight_norm"]
                for r in history
                if layer in r["layers"] and r["layers"][layer]["weight_norm"] > 0
            ]
            if values:
                baseline[layer] = statistics.median(values)
    top = largest_rise(ratios, baseline)
    if top is None:
        return None, "no layer's gradient could be read"
    layer, x = top
    if baseline and baseline.get(layer):
        return layer, f"largest gradient rise at the spike ({x:.1f}x its median)"
    return layer, f"largest gradient relative to its weights at the spike ({x:.3g})"


def describe_spike(event: dict[str, Any]) -> str:
    """One plain-language line: "step 1,240: loss spike (z = 9.3); ...; rolled back to ...\""""
    text = f"step {event['step']:,}: loss spike {event['loss']:.4g} (z = {event['z']:.1f}"
    text += f" above the median {event['median']:.4g})"
    if event.get("layer"):
        text += f"; {event['layer']}: {event['why']}"
    action = event["action"]
    if action == "rollback":
        a, b = event["skipped"]
        text += (
            f"; rolled back to step {event['rolled_back_to']:,}, skipped samples {a:,}-{b:,}"
            f", LR x {event['lr_scale']:.3g}"
        )
    else:
        text += {"warn": "; kept", "skip": "; update skipped", "stop": "; run stopped"}[action]
    return text
