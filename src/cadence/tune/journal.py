"""A journal-file study with heartbeats, so a dead worker's trial is retried there too.

Optuna's ``RDBStorage`` records a heartbeat per running trial and lets the next worker fail and
retry a trial whose heartbeat stopped; its ``JournalStorage`` (Optuna 5.1) implements none of it,
so on a journal file a killed worker's trial would stay RUNNING for ever. This subclass adds the
same protocol (Optuna's ``BaseHeartbeat``, which ``Study.optimize`` already drives: a thread that
beats while the trial runs, ``fail_stale_trials`` before each new trial) with the heartbeat kept
as a trial system attribute in the journal itself, so it needs nothing but the shared file.

The time is each worker's wall clock (a journal has no server clock), so workers' clocks must
agree to well within the grace period, as NTP keeps them. Each beat is one line in the journal.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import JournalStorage

# Optuna's heartbeat interface lives in a private module but is what Study.optimize checks
# (isinstance) to run heartbeats; it has kept this shape since Optuna 2.x.
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

if TYPE_CHECKING:
    from optuna.storages.journal import BaseJournalBackend
    from optuna.trial import FrozenTrial

__all__ = ["HEARTBEAT_ATTR", "HeartbeatJournalStorage"]

HEARTBEAT_ATTR = "cadence:heartbeat"  # trial system attribute: the last beat, Unix seconds

StaleCallback = Callable[[optuna.Study, "FrozenTrial"], None]


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """``JournalStorage`` whose running trials beat every ``heartbeat_interval`` seconds; a
    RUNNING trial silent for ``grace_period`` is stale, failed by the next worker that looks,
    and handed to ``stale_callback`` (the retry)."""

    def __init__(
        self,
        backend: BaseJournalBackend,
        *,
        heartbeat_interval: int,
        grace_period: int,
        stale_callback: StaleCallback | None,
    ) -> None:
        super().__init__(backend)
        self._interval = heartbeat_interval
        self._grace = grace_period
        self._stale_callback = stale_callback

    def record_heartbeat(self, trial_id: int) -> None:
        # Another worker may have declared this trial dead (its beats came too late): then
        # there is nothing to beat for any more, and Study.tell reports it when the trial ends.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat: Any = t.system_attrs.get(HEARTBEAT_ATTR)
            # A trial that never beat is left alone, as RDBStorage leaves a trial without a
            # heartbeat row: it was started by a worker that does not beat. A retry inherits
            # its dead predecessor's last beat: its own start (when a worker popped it) is
            # newer, and counts until its first beat lands.
            if not isinstance(beat, (int, float)):
                continue
            started = t.datetime_start.timestamp() if t.datetime_start else 0.0
            if now - max(beat, started) > self._grace:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int:
        return self._interval

    def get_heartbeat_stale_trial_callback(self) -> StaleCallback | None:
        return self._stale_callback

    # Optuna < 4.9 asked for the callback by this name.
    def get_failed_trial_callback(self) -> StaleCallback | None:
        return self._stale_callback
