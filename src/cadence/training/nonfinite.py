"""The non-finite policy: what a run does with a step whose loss or gradient is NaN/inf.

The step's update has not been applied when this runs (the step's host read saw it first).

- ``stop``: end the run at the last good state (the checkpoint written on stopping holds it);
- ``skip``: move past the batch without an update (the data order of the run is kept), giving
  up after ``MAX_CONSECUTIVE_SKIPS`` bad steps in a row;
- ``rollback``: reload the newest valid checkpoint and lower the LR by
  ``train.rollback_lr_factor``, at most ``MAX_ROLLBACKS`` times.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cadence.training.stopping import StopKind, StopReason

if TYPE_CHECKING:
    from cadence.training.state import TrainState

MAX_CONSECUTIVE_SKIPS = 10
MAX_ROLLBACKS = 5


def handle_nonfinite(
    st: TrainState,
    *,
    policy: str,
    size: int,
    tokens_per_sample: int,
    rollback_lr_factor: float,
    latest_checkpoint: Callable[[], Path | None],
    restore: Callable[[Path], None],
) -> StopReason | None:
    """Apply `policy` to the bad step after `st.step`; the stop it ends in, if any.

    `latest_checkpoint` finds the checkpoint a rollback goes back to, and `restore` loads it
    (both agreed across processes by the caller).
    """
    bad_step = st.step + 1
    if policy == "skip":
        drop_batch(st, size, tokens_per_sample)
        if st.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            why = f"{st.consecutive_skips} steps in a row"
            return StopReason(StopKind.NONFINITE, bad_step, why)
        return None
    st.skipped_steps += 1
    st.consecutive_skips += 1
    if policy == "stop":
        return StopReason(StopKind.NONFINITE, bad_step)
    path = latest_checkpoint()
    if path is None or st.rollbacks >= MAX_ROLLBACKS:
        why = "no checkpoint to roll back to" if path is None else "too many rollbacks"
        return StopReason(StopKind.NONFINITE, bad_step, why)
    reload(st, path, restore, rollback_lr_factor)
    return None


def drop_batch(st: TrainState, size: int, tokens_per_sample: int) -> None:
    """A bad step's batch passed over without an update (a non-finite loss or a spike): the
    data order of the run is kept, and the step counts as skipped."""
    st.skipped_steps += 1
    st.consecutive_skips += 1
    st.samples += size
    st.tokens += size * tokens_per_sample


def reload(st: TrainState, path: Path, restore: Callable[[Path], None], lr_factor: float) -> None:
    """A rollback to ``path``: every counter becomes the checkpoint's, except the run's record
    of its trouble (rollbacks, one more; skipped steps; spikes), and the LR scale is lowered."""
    kept = (st.rollbacks + 1, st.lr_scale * lr_factor, st.skipped_steps, st.spikes)
    restore(path)  # replaces every counter of `st` with the checkpoint's
    st.rollbacks, st.lr_scale, st.skipped_steps, st.spikes = kept
