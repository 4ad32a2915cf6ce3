"""``train.async_checkpoint``: the training loop copies its state and goes on; a thread writes.

A checkpoint of a large model stalls training for as long as the disk takes. Here the loop
pays only for a copy of the state into host memory (the weights to save, the optimizer's
tensors, the RNG and counters, each cloned, so the next steps cannot change what is being
written); one background thread then writes it with the same rules as a synchronous save:
a temporary folder, checksums, fsync, an atomic rename, pruning to ``keep_checkpoints``. A
crash mid-write leaves only the temporary folder, which no resume takes for a checkpoint.

One write is in flight at a time: the next save, a rollback (which must see the newest
checkpoint) and the end of the run wait for it, and a write that failed raises there, in the
training thread, as the OSError it was. The final checkpoint of a run is written synchronously.
Sharded (FSDP2) checkpoints are not written this way yet.
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
