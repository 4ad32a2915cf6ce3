"""The error of a checkpoint that cannot be used.

Its own module because both checkpoint layouts raise it: checkpoint.py (the whole layout, the
manifest, the checksums) imports sharded.py (the FSDP layout), so the type sits below both.
"""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and why."""
