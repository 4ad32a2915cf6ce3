"""Stateless, resumable sampling order.

The data position of a run is the number of samples consumed so far. Which
dataset index the k-th sample is depends only on (seed, k), so resuming at any
position is free: no replaying of skipped batches and no sampler state in the
checkpoint beyond one integer.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["EpochSampler", "RandomOffsets"]

_EPOCH_STRIDE = 1_000_003


class EpochSampler:
    """An infinite stream of epochs, each a permutation of ``range(n)``.

    Epoch ``e`` is ``torch.randperm(n)`` from a generator seeded with
    ``seed * 1_000_003 + e``, so any epoch can be regenerated on demand.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        if n < 1:
            raise ValueError(f"EpochSampler needs a non-empty dataset, got n={n}")
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._cached_epoch: int | None = None
        self._cached_perm: torch.Tensor | None = None

    def epoch_of(self, sample: int) -> int:
        """The epoch the sample at stream position ``sample`` belongs to."""
        if sample < 0:
            raise ValueError(f"sample position must be >= 0, got {sample}")
        return sample // self.n

    def permutation(self, epoch: int) -> torch.Tensor:
        """Dataset order for ``epoch`` (cached: consecutive batches hit the same epoch)."""
        if self._cached_epoch == epoch and self._cached_perm is not None:
            return self._cached_perm
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(self.seed * _EPOCH_STRIDE + epoch)
            perm = torch.randperm(self.n, generator=gen)
        else:
            perm = torch.arange(self.n, dtype=torch.long)
        self._cached_epoch = epoch
        self._cached_perm = perm
        return perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Dataset indices of stream samples ``[start, start + count)``; may span epochs."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
        parts: list[torch.Tensor] = []
        pos, end = start, start + count
        while pos < end:
            epoch = pos // self.n
            offset = pos - epoch * self.n
            take = min(self.n - offset, end - pos)
            parts.append(self.permutation(epoch)[offset : offset + take])
            pos += take
        if not parts:
            return torch.empty(0, dtype=torch.long)
        return torch.cat(parts)


_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser over uint64 (wrapping arithmetic): a well-mixed hash of x."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class RandomOffsets:
    """Stream sample ``k`` -> a window start drawn from ``hash(seed, k)``, uniform over
    ``[0, n_positions)``.

    The random-offset counterpart of :class:`EpochSampler` (nanoGPT's ``torch.randint`` windows,
    made addressable): the window of any sample is a pure function of (seed, k), so resuming
    at sample k reads nothing that was skipped, and the draw does not depend on how many
    processes split the batch. ``n`` is the number of non-overlapping windows, so that an
    "epoch" means as many tokens as a packed epoch.
    """

    def __init__(self, n: int, n_positions: int, seed: int) -> None:
        if n < 1 or n_positions < 1:
            raise ValueError(
                f"RandomOffsets needs n >= 1 and positions >= 1, got {n}, {n_positions}"
            )
        self.n = int(n)
        self.n_positions = int(n_positions)
        self.seed = int(seed)
        self._key = _splitmix64(np.uint64(self.seed & _MASK) ^ np.uint64(_GOLDEN))

    def indices(self, start: int, count: int) -> torch.Tensor:
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
        k = np.arange(start, start + count, dtype=np.uint64)
        h = _splitmix64(k ^ self._key)
        return torch.from_numpy((h % np.uint64(self.n_positions)).astype(np.int64))
