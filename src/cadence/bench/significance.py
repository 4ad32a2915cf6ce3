"""Is a difference between two strategies more than noise? Paired tests over studies (seeds).

Two strategies in the same study train on the same seed (data order, initialisation), so their
results pair up, and a paired test removes the seed-to-seed variation both share. The
modded-nanogpt optimisation track settles records the same way, with t-tests over runs.

- Every pair finite: a paired t-test on the differences, with a t interval of the mean
  difference (``scipy.stats``). A constant non-zero difference has no spread and is taken as
  significant (p = 0); identical results are not (p = 1).
- Some pair has a miss (infinite): differences are not defined, so the exact two-sided sign
  test counts who got there first in each pair (a miss loses to any finite value; ties,
  including two misses, drop out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["mean_ci", "paired_test"]


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """(mean, lo, hi): the t interval of the mean, or None with a miss or fewer than 2 values."""
    xs = np.asarray(list(values), dtype=float)
    if xs.size < 2 or not np.all(np.isfinite(xs)):
        return None
    from scipy import stats

    mean = float(xs.mean())
    half = float(stats.t.ppf(0.5 + level / 2, xs.size - 1) * xs.std(ddof=1) / math.sqrt(xs.size))
    return mean, mean - half, mean + half


def paired_test(
    a: Sequence[float], b: Sequence[float], alpha: float = 0.05, level: float = 0.95
) -> dict[str, Any]:
    """Test ``a`` against ``b`` (the same studies, in the same order; lower is better).

    Returns the test used, the number of pairs, the mean difference a - b and its interval
    (t-test only), the wins of each side, the two-sided p-value and whether p < ``alpha``.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_test: {len(a)} values against {len(b)}; pairs are needed")
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    wins_a, wins_b = int(np.sum(x < y)), int(np.sum(y < x))
    out: dict[str, Any] = {
        "n": int(x.size),
        "wins_a": wins_a,
        "wins_b": wins_b,
        "mean_diff": None,
        "ci": None,
        "p": None,
        "test": None,
        "significant": False,
    }
    if x.size < 2:
        return {**out, "test": "too few studies"}
    from scipy import stats

    if np.all(np.isfinite(x)) and np.all(np.isfinite(y)):
        d = x - y
        sd = float(d.std(ddof=1))
        mean = float(d.mean())
        if sd == 0.0:
            p = 1.0 if mean == 0.0 else 0.0
            ci = (mean, mean)
        else:
            t = mean / (sd / math.sqrt(d.size))
            p = float(2 * stats.t.sf(abs(t), d.size - 1))
            half = float(stats.t.ppf(0.5 + level / 2, d.size - 1) * sd / math.sqrt(d.size))
            ci = (mean - half, mean + half)
        out.update(test="paired t", mean_diff=mean, ci=ci, p=p)
    else:
        n = wins_a + wins_b
        p = 1.0 if n == 0 else float(stats.binomtest(wins_a, n, 0.5).pvalue)
        out.update(test="sign", p=p)
    out["significant"] = bool(out["p"] < alpha)
    return out
