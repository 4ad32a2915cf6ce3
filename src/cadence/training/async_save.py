"""``train.async_checkpoint``: the training loop copies its state and goes on; a thread writes.

A checkpoint of a large model stalls training for as long as the disk takes. Here the loop
pays only for a copy of the state into host memory (each tensor cloned, so the next steps
cannot change what is being written); a background thread then writes it with the same rules
as a synchronous save: a temporary folder, checksums, fsync, an atomic rename, pruning to
``keep_checkpoints``. A crash mid-write leaves only the temporary folder, which no resume takes
for a checkpoint.

Two kinds of write:

- whole (one process, DDP): rank 0 copies the weights, the optimizer's tensors, the RNG and the
  counters (``host_copy``) and its thread writes the folder.
- sharded (FSDP2): every rank hands its shards to ``torch.distributed.checkpoint.async_save``,
  which stages them to host memory before returning and writes them on a thread of its own.
  DCP's save is a collective (plan, write, metadata), so it talks over a gloo process group of
  its own (``BackgroundWriter.group``): on the training group, the save's collectives on the
  thread and training's on the loop would interleave in a different order on each rank. Each
  rank's writer thread waits for its DCP save; rank 0's then writes trainer.pt and the manifest
  (checksums of every rank's shard files), fsyncs and renames the folder into place. No barrier
  is needed for that: DCP's own write step gathers every rank's result on rank 0 before it
  writes the metadata, so rank 0's save ends only once every rank's shards are on disk. A
  process killed before the rename leaves the temporary folder, even one that already holds
  every shard and DCP's metadata: resume reads only renamed folders whose manifest verifies.

One write is in flight at a time: the next save, a rollback (which must see the newest
checkpoint) and the end of the run wait for it, each rank for its own thread only, so the wait
is never a collective that a rank could miss. A write that failed raises there, in the
training thread, as the OSError it was; a sharded one on every rank, whichever rank's write
failed (DCP's write step tells them all; sharded.failed_writes). The final checkpoint of a run
is written synchronously.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch


def host_copy(obj: Any) -> Any:
    """``obj`` with every tensor cloned to the CPU (containers rebuilt, scalars shared)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class BackgroundWriter:
    """Runs one write at a time on a thread; errors surface at the next ``wait``."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # sharded runs: the gloo process group DCP's background saves talk over, made by every
        # rank at the first one (sharded.background_group)
        self.group: Any = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                write()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
                self._error = exc

        self._thread = threading.Thread(target=run, name="cadence-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Until the write in flight is on disk; its error, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        self.wait()
