"""Writing one split of a prepared corpus as shards (the format of :mod:`cadence.data.shards`).

Shard ``k`` always holds tokens ``[k * cap, (k + 1) * cap)`` of the split's stream, and is
written under a ``.tmp`` name and renamed only when complete, so a killed prepare leaves only
whole shards, and a rerun over the same stream can recognise them by their SHA-256 and keep
them untouched instead of rewriting them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ShardWriter"]


class ShardWriter:
    """One split's token stream cut into shards of exactly ``cap`` tokens (the last: fewer).

    ``record`` is the progress file's list of finished shards; an entry left by an interrupted
    run is kept when the recomputed tokens hash the same (the file is not touched).
    """

    def __init__(
        self,
        out: Path,
        split: str,
        dtype: np.dtype,
        cap: int,
        record: list,
        commit: Callable[[], None],
    ):
        self.out, self.split, self.cap, self.record, self.commit = out, split, cap, record, commit
        self.dtype = dtype.newbyteorder("<")  # the format is little-endian on any machine
        self.k = self.fill = 0
        self.fh: Any = None
        self.parts: list[np.ndarray] = []
        self.reuse: dict | None = None
        self.hash = hashlib.sha256()

    def _path(self) -> Path:
        return self.out / f"{self.split}-{self.k:05d}.bin"

    def _open(self) -> None:
        self.hash, self.parts, self.reuse = hashlib.sha256(), [], None
        path = self._path()
        old = self.record[self.k] if self.k < len(self.record) else None
        if (
            old is not None
            and old["file"] == path.name
            and path.is_file()
            and path.stat().st_size == old["tokens"] * self.dtype.itemsize
        ):
            self.reuse = old  # hold the tokens in memory until they prove equal
        else:
            self.fh = path.with_name(path.name + ".tmp").open("wb")

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self.fill == 0 and self.fh is None and self.reuse is None:
                self._open()
            take = min(self.cap - self.fill, ids.size)
            part, ids = ids[:take], ids[take:]
            self.hash.update(part)
            if self.reuse is not None:
                self.parts.append(part)
            else:
                self.fh.write(part)
            self.fill += take
            if self.fill == self.cap:
                self._close()

    def _close(self) -> None:
        path, sha, old = self._path(), self.hash.hexdigest(), self.reuse
        if old is not None and (old["tokens"], old["sha256"]) != (self.fill, sha):
            self.fh = path.with_name(path.name + ".tmp").open("wb")
            for part in self.parts:
                self.fh.write(part)
            old = None
        if old is None:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            os.replace(self.fh.name, path)
        entry = {"file": path.name, "tokens": self.fill, "sha256": sha}
        if self.k < len(self.record):
            self.record[self.k] = entry
        else:
            self.record.append(entry)
        self.fh, self.parts, self.reuse = None, [], None
        self.k, self.fill = self.k + 1, 0
        self.commit()

    def finish(self) -> list[dict]:
        """Close the last shard; the split's shards in order."""
        if self.fill:
            self._close()
        for stale in self.record[self.k :]:  # only if the stream got shorter
            (self.out / stale["file"]).unlink(missing_ok=True)
        del self.record[self.k :]
        return list(self.record)
