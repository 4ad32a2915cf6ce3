"""A study that several workers run together to a fixed number of trials (``--study-trials N``).

``Study.optimize(n_trials=N)`` counts the calling worker's trials; Optuna's ``MaxTrialsCallback``
counts the study's but checks only after a trial ends, so two workers that finish together both
see N-1, both start one, and the study ends at N+1. Here the gate is where a trial is born:
:meth:`SharedStudy.ask` (which ``Study.optimize`` calls for each trial) counts the study's trials
and claims the next one under the storage's lock (study_lock.py), so the study never holds more
than N counted trials, whatever the number of workers.

What counts toward N: every trial that is finished (COMPLETE, PRUNED, or FAIL for good), running
or queued. A FAIL that was retried does not: its retry (queued with the same parameters, system
attribute ``retry_history`` naming it) takes its place, so a trial whose worker died is counted
once. When N trials are claimed and some still run on other workers, a worker waits for them
rather than leave: if one of those workers has died, the waiting worker is the one that notices
(its heartbeat stops) and runs the retry, so the study reaches N while any worker lives, and
every worker's outputs describe the whole, finished study.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial

    from cadence.tune.study_lock import StudyLock

__all__ = [
    "BudgetSpent",
    "SharedStudy",
    "counted",
    "retried_numbers",
    "retry_of",
    "worker_id",
]


class BudgetSpent(Exception):
    """Raised out of ``Study.optimize`` by :meth:`SharedStudy.ask`: the study has its trials."""


def worker_id() -> str:
    """``host:pid``: who ran a trial (user attribute ``worker``), unique among live workers."""
    return f"{socket.gethostname()}:{os.getpid()}"


def retried_numbers(trials: Iterable[FrozenTrial]) -> dict[int, int]:
    """Failed trial number -> the number of the trial that retried it (its immediate retry)."""
    by: dict[int, int] = {}
    for t in trials:
        before = retry_of(t)
        if before is not None:
            by[before] = t.number
    return by


def retry_of(trial: FrozenTrial) -> int | None:
    """The trial this one retries (the last of Optuna's ``retry_history``), or None."""
    history = trial.system_attrs.get("retry_history")
    if isinstance(history, list) and history:
        return int(history[-1])
    failed = trial.system_attrs.get("failed_trial")
    return None if failed is None else int(failed)


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count toward the study's total: all but the failed ones that were retried
    (and none of them twice)."""
    superseded = set(retried_numbers(trials))
    return [t for t in trials if not (t.state == TrialState.FAIL and t.number in superseded)]


class SharedStudy(optuna.Study):
    """An Optuna study whose :meth:`ask` refuses to start a trial beyond ``total``.

    ``total=None`` is a plain study (each worker runs its own ``n_trials``). Built over a study
    that already exists in the storage (``optuna.create_study(..., load_if_exists=True)`` first).
    """

    def __init__(
        self,
        study_name: str,
        storage: Any,
        *,
        sampler: optuna.samplers.BaseSampler,
        pruner: optuna.pruners.BasePruner,
        total: int | None,
        lock: StudyLock,
        poll_s: float,
    ) -> None:
        super().__init__(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        self.total = total
        self._lock = lock
        self._poll_s = poll_s

    def ask(self, fixed_distributions: dict[str, BaseDistribution] | None = None) -> optuna.Trial:
        if self.total is None:
            return super().ask(fixed_distributions)
        while True:
            self._fail_stale()
            with self._lock(self.study_name):
                trials = self.get_trials(deepcopy=False)
                waiting = any(t.state == TrialState.WAITING for t in trials)
                if waiting or len(counted(trials)) < self.total:
                    # A queued trial (a retry) is already counted: popping it adds nothing.
                    return super().ask(fixed_distributions)
            if not any(t.state == TrialState.RUNNING for t in trials):
                raise BudgetSpent(f"{self.total} trials")
            time.sleep(self._poll_s)  # others' trials still run: wait for them, or their retries

    def _fail_stale(self) -> None:
        """Fail (and retry) trials whose heartbeat stopped; Optuna does this before each trial,
        the waiting loop needs it between polls too."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self)
