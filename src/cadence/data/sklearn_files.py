"""The small datasets scikit-learn ships as files (8x8 digits, breast cancer), read directly.

scikit-learn's loaders would read the same files, but importing scikit-learn pulls in SciPy's
statistics stack: 3.6 s of every run on digits or logreg on the project's CI machine (AMD EPYC,
2026-12-05), more than the run itself. The files are found from scikit-learn's install location
without importing it, and parsed as its loaders parse them (tests/unit/test_sklearn_files.py
holds the two to the same arrays).
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np

from cadence.data.errors import DataError

__all__ = ["breast_cancer", "digits"]


def _data_file(name: str) -> Path:
    spec = importlib.util.find_spec("sklearn")  # finds the package, runs none of it
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root) / "datasets" / "data" / name
        if path.is_file():
            return path
    raise DataError(
        f"data: scikit-learn's {name} was not found; install scikit-learn (pip install scikit-learn)"
    )


def digits() -> tuple[np.ndarray, np.ndarray]:
    """(pixels float64 [1797, 64] in 0..16, labels int64 [1797])."""
    data = np.loadtxt(_data_file("digits.csv.gz"), delimiter=",")
    return data[:, :-1], data[:, -1].astype(np.int64)


def breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """(features float64 [569, 30], labels int64 [569]); the header row gives the shape."""
    with open(_data_file("breast_cancer.csv"), encoding="utf-8") as fh:
        rows = csv.reader(fh)
        n, d = (int(v) for v in next(rows)[:2])
        data = np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    if data.shape != (n, d + 1):
        raise DataError(f"data: breast_cancer.csv has shape {data.shape}, its header says {n}x{d}")
    return data[:, :d], data[:, d].astype(np.int64)
