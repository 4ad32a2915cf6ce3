"""Validation-driven hyperparameter search with Optuna, pruning bad trials early.

Each trial is a real run: the config with the trial's values, the real :class:`Trainer` and
:func:`fit`, and a callback whose ``on_eval`` reports the validation loss to Optuna and raises
``optuna.TrialPruned`` when the pruner says so. ``fit`` has no ``try`` around the loop, so the
exception leaves ``Trainer.evaluate`` -> ``fit`` -> the objective, and Optuna records the trial as
pruned at the step it reached: a pruned trial costs only the steps it ran. The search space and
its checks are in space.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadence.config import Config, ConfigError, dump_config
from cadence.runtime.events import Callback, TrainerView
from cadence.tune.space import (
    Param,
    apply_params,
    load_space,
    parse_space,
    split_search_section,
    thaw,
)
from cadence.tune.storage import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_MAX_RETRY,
    StudyStorage,
    open_storage,
)

if TYPE_CHECKING:
    import optuna

    from cadence.tune.shared_study import SharedStudy
    from cadence.workloads import Workload

__all__ = [
    "PRUNERS",
    "Param",
    "PruningCallback",
    "TuneResult",
    "apply_params",
    "check_budget",
    "load_space",
    "make_pruner",
    "parse_space",
    "run_sweep",
    "split_search_section",
]

PRUNERS = ("median", "halving", "hyperband", "none")


# ---------------------------------------------------------------- running trials


class PruningCallback(Callback):
    """Report each evaluation's metric to the trial; raise ``TrialPruned`` when told to."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.reports = 0

    def on_eval(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        import optuna

        value = metrics.get(self.metric)
        step = trainer.state.step
        if value is None or not math.isfinite(value):
            self._record(trainer)
            raise optuna.TrialPruned(f"{self.metric} is not finite at step {step}")
        self.trial.report(float(value), step)
        self.reports += 1
        if not trainer.stopping and self.trial.should_prune():
            self._record(trainer)
            raise optuna.TrialPruned(f"pruned at step {step}")

    def _record(self, trainer: TrainerView) -> None:
        # The compute a pruned trial spent; storage writes are slow, so only when it ends.
        self.trial.set_user_attr("steps", trainer.state.step)
        self.trial.set_user_attr("samples", trainer.state.samples)


@dataclass
class TuneResult:
    study_name: str
    storage: str
    metric: str
    direction: str
    best_value: float
    best_params: dict[str, Any]
    best_config: Config
    trials: list[dict[str, Any]]  # number, state, params, value, steps, samples, worker, ...
    n_complete: int
    n_pruned: int
    n_failed: int
    total_steps: int  # optimizer steps over all trials of this invocation: the compute spent
    total_samples: int
    wall_time_s: float
    worker: str = ""  # host:pid of this invocation; n_complete ... total_samples count its trials
    study_trials: int | None = None  # --study-trials: the total the workers run together
    n_study_trials: int = 0  # the study's finished trials, a retried one counted once
    workers: list[str] = dataclasses.field(default_factory=list)  # every worker of the study

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["best_config"] = self.best_config.to_dict()
        return d


def make_pruner(name: str, eval_every: int, max_steps: int, n_startup: int) -> Any:
    """Median (compare with the running median of earlier trials at the same step), successive
    halving or Hyperband (resources counted in optimizer steps), or none."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=n_startup, n_warmup_steps=eval_every)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_every, reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=eval_every, max_resource=max_steps, reduction_factor=3
        )
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner: unknown pruner {name!r}; choose one of: {', '.join(PRUNERS)}")


class _WorkloadCache:
    """Build each distinct dataset once per sweep; later trials only re-initialise the model.

    Trials that change nothing about data or model (LR, optimizer, schedule, batch) reuse the
    loaded data and reset the weights to the seeded initial state, which is what
    ``build_workload`` would have produced anyway.
    """

    def __init__(self) -> None:
        self._items: dict[str, tuple[Workload, dict[str, Any]]] = {}

    def get(self, cfg: Config) -> Workload:
        from cadence.workloads import build_workload

        key = json.dumps(
            [
                cfg.workload,
                dataclasses.asdict(cfg.data),
                dataclasses.asdict(cfg.model),
                cfg.train.seed,
                cfg.train.device,
                cfg.train.eval_samples,
            ],
            sort_keys=True,
            default=str,
        )
        if key not in self._items:
            w = build_workload(cfg)
            init = {k: v.detach().clone() for k, v in w.model.state_dict().items()}
            self._items[key] = (w, init)
            return w
        w, init = self._items[key]
        w.model.load_state_dict(init)
        for p in w.model.parameters():
            p.grad = None
        w.model.train()
        return w


def check_budget(trials: int | None, study_trials: int | None) -> None:
    """Exactly one budget, at least one trial: checked by `run_sweep` and, before it opens the
    storage or makes the run directory, by `cadence tune`."""
    if (trials is None) == (study_trials is None):
        raise ConfigError(
            "tune: give one of --trials N (run N more trials) or --study-trials N (run until the "
            "study holds N, with every worker on the same --storage and --study)"
        )
    for flag, value in (("--trials", trials), ("--study-trials", study_trials)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}")


def run_sweep(
    base: Config,
    space: dict[str, Any] | Sequence[Param],
    *,
    trials: int | None = None,
    out_dir: str | Path,
    storage: str | StudyStorage | None = None,
    study_name: str | None = None,
    pruner: str = "median",
    metric: str = "val_loss",
    sampler_seed: int | None = None,
    study_trials: int | None = None,
    heartbeat_s: int = DEFAULT_HEARTBEAT_S,
    max_retry: int = DEFAULT_MAX_RETRY,
    on_trial: Callable[[dict[str, Any], int, int], None] | None = None,
) -> TuneResult:
    """Run trials of a (possibly resumed, possibly shared) study and write the results.

    Give exactly one budget. ``trials``: this call runs that many more trials (what one machine
    wants; two processes on one study each run their own N). ``study_trials``: run until the
    study holds that many trials, together with every other worker on the same storage and
    study name, each trial claimed once (shared_study.py); running the same call again resumes
    the study, and a larger number extends it. A separate option rather than a meaning of
    ``trials`` that changes with the storage: the same command line keeps one meaning on
    SQLite and on PostgreSQL.

    ``storage`` is what ``--storage`` takes (storage.py: SQLite in ``out_dir`` by default,
    ``postgresql://...``, ``journal:PATH``) or an already opened :class:`StudyStorage`; every
    storage has heartbeats every ``heartbeat_s`` seconds, and a trial whose worker dies is
    retried (up to ``max_retry`` times) by a live worker. ``study_name`` resumes that study
    when it exists. Writes ``best.yaml`` (ready for ``cadence train``), ``tune.json`` (every
    trial of the study, with the worker that ran it and the trial it retries) and
    ``plots/*.png``: each worker writes the whole study's, so any worker's outputs will do.
    """
    import optuna

    from cadence.tune.shared_study import (
        SharedStudy,
        counted,
        retried_numbers,
        worker_id,
    )

    check_budget(trials, study_trials)
    params = list(space) if not isinstance(space, dict) else parse_space(space, base)
    out = Path(out_dir)
    store = storage
    if isinstance(storage, str):  # a named storage is checked before anything is written
        store = open_storage(storage, out, heartbeat_s=heartbeat_s, max_retry=max_retry)
    out.mkdir(parents=True, exist_ok=True)
    if store is None:
        store = open_storage(None, out, heartbeat_s=heartbeat_s, max_retry=max_retry)
    assert isinstance(store, StudyStorage)
    study_name = study_name or f"cadence-{base.workload}"
    cache = _WorkloadCache()
    w = cache.get(base)  # built once here, reused by the first trial with the same data/model
    higher = w.higher_is_better if metric == w.metric else metric.endswith("accuracy")
    direction = "maximize" if higher else "minimize"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    budget = study_trials if study_trials is not None else trials
    assert budget is not None
    n_startup = max(2, min(5, budget // 4))
    shared = store.shared or study_trials is not None
    me = worker_id()
    pruner_obj = make_pruner(pruner, base.train.eval_every, base.train.max_steps, n_startup)
    try:
        existing = optuna.create_study(
            storage=store.backend,
            study_name=study_name,
            direction=direction,
            load_if_exists=True,
            pruner=pruner_obj,
        )
        # The sampler's seed: the config's for a fresh study on one machine (reproducible);
        # mixed with what the study already holds on a resume (else its first trials replay),
        # and with the worker for a shared study (else two workers draw the same trials).
        seed = base.train.seed if sampler_seed is None else sampler_seed
        first = len(existing.trials)
        if shared or first:
            seed = zlib.crc32(f"{seed}:{first}:{me if shared else ''}".encode())
        study = SharedStudy(
            study_name,
            store.backend,
            sampler=optuna.samplers.TPESampler(
                seed=seed,
                n_startup_trials=max(3, min(10, budget // 3)),
                constant_liar=shared,  # running trials count as bad: workers spread out
            ),
            pruner=pruner_obj,
            total=study_trials,
            lock=store.lock,
            poll_s=min(2.0, store.heartbeat_s / 2),  # waiting for the last trials of others
        )
    except ValueError as exc:  # e.g. a resumed study with the other direction
        raise ConfigError(f"--study {study_name}: {exc}") from None
    except Exception as exc:  # the database went away between opening and now
        raise ConfigError(f"--storage {store.display}: cannot open the study ({exc})") from None
    study.set_user_attr("metric", metric)
    t0 = time.perf_counter()

    ran: set[int] = set()  # the trials this call ran, popped retries of older ones included

    def objective(trial: optuna.Trial) -> float:
        ran.add(trial.number)
        trial.set_user_attr("worker", me)  # a retry inherits its dead predecessor's
        try:
            return run_trial(trial)
        except KeyboardInterrupt:
            _requeue(study, trial.number, store)  # Ctrl-C: this trial runs again, here or elsewhere
            raise

    def run_trial(trial: optuna.Trial) -> float:
        from cadence.training import Trainer, fit

        values = {p.key: p.suggest(trial) for p in params}
        cfg = apply_params(base, values)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))
        cb = PruningCallback(trial, metric)
        summary = fit(Trainer(cfg, cache.get(cfg), [cb]))
        trial.set_user_attr("steps", summary["steps"])
        trial.set_user_attr("samples", summary["samples"])
        if metric not in (summary.get("final_metrics") or {}):
            raise ConfigError(
                f"--metric {metric}: not reported by workload {cfg.workload!r}; "
                f"choose one of: {', '.join(sorted(summary.get('final_metrics') or {}))}"
            )
        best = (
            summary["best_val_loss"] if metric == "val_loss" else summary["final_metrics"][metric]
        )
        if best is None or not math.isfinite(best):
            raise optuna.TrialPruned("the run diverged")
        return float(best)

    def report(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        if on_trial is None:
            return
        everything = study.get_trials(deepcopy=False)
        if study_trials is None:
            done, n = sum(t.state.is_finished() for t in everything if t.number in ran), budget
        else:
            done = sum(t.state.is_finished() for t in counted(everything))
            n = study_trials
        on_trial(_trial_row(frozen, params, retried_numbers(everything)), done, n)

    _optimize(study, objective, trials, report, ran)
    wall = time.perf_counter() - t0
    everything = study.get_trials()
    retried = retried_numbers(everything)
    rows = [_trial_row(t, params, retried) for t in everything]
    complete = [t for t in everything if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ConfigError(
            "tune: no trial completed (all were pruned or failed); widen the search space, "
            "raise train.max_steps or use --pruner none"
        )
    best_trial = study.best_trial
    best_values = {
        p.key: p.decode(best_trial.params[p.key]) for p in params if p.key in best_trial.params
    }
    best_cfg = apply_params(base, best_values)
    mine_rows = [r for r in rows if r["number"] in ran]
    result = TuneResult(
        study_name=study_name,
        storage=store.display,
        metric=metric,
        direction=direction,
        best_value=float(best_trial.value),
        best_params={k: thaw(v) for k, v in best_values.items()},
        best_config=best_cfg,
        trials=rows,
        n_complete=sum(r["state"] == "COMPLETE" for r in mine_rows),
        n_pruned=sum(r["state"] == "PRUNED" for r in mine_rows),
        n_failed=sum(r["state"] == "FAIL" for r in mine_rows),
        total_steps=sum(r["steps"] or 0 for r in mine_rows),
        total_samples=sum(r["samples"] or 0 for r in mine_rows),
        wall_time_s=wall,
        worker=me,
        study_trials=study_trials,
        n_study_trials=sum(t.state.is_finished() for t in counted(everything)),
        workers=sorted({r["worker"] for r in rows if r["worker"]}),
    )
    _write_outputs(result, study, out)
    return result


def _optimize(
    study: SharedStudy,
    objective: Callable[[optuna.Trial], float],
    trials: int | None,
    report: Callable[..., None],
    ran: set[int],
) -> None:
    """``study.optimize`` until this worker's ``trials`` are done or, with a total, the study's.

    One case ends a trial from outside: another worker declared it dead (its heartbeats came
    later than the grace period: a stalled machine, a network partition) and queued its retry.
    Optuna then refuses to record the result; the retry stands, and this worker carries on.
    """
    from cadence.tune.shared_study import BudgetSpent

    while True:
        left = None if trials is None else trials - len(ran)
        if left is not None and left <= 0:
            return
        try:
            study.optimize(objective, n_trials=left, callbacks=[report], catch=(ConfigError,))
            return
        except BudgetSpent:
            return
        except ValueError as exc:
            if not str(exc).startswith("Cannot tell a"):
                raise
            print(
                f"cadence: warning: tune: {exc} (failed by another worker); continuing",
                file=sys.stderr,
            )


def _requeue(study: optuna.Study, number: int, store: StudyStorage) -> None:
    """Queue an interrupted trial's parameters again, as for a worker that died."""
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            store.retry(study, t)


def _trial_row(
    t: optuna.trial.FrozenTrial, params: Sequence[Param], retried: dict[int, int] | None = None
) -> dict[str, Any]:
    from cadence.tune.shared_study import retry_of

    by_key = {p.key: p for p in params}
    return {
        "number": t.number,
        "state": t.state.name,
        "params": {k: thaw(by_key[k].decode(v)) if k in by_key else v for k, v in t.params.items()},
        "value": t.value,
        "steps": t.user_attrs.get("steps"),
        "samples": t.user_attrs.get("samples"),
        "intermediate": {int(k): v for k, v in t.intermediate_values.items()},
        "worker": t.user_attrs.get("worker"),  # host:pid of the worker that ran it
        "retry_of": retry_of(t),  # the trial whose worker died, that this one runs again
        "retried_by": (retried or {}).get(t.number),  # set on such a dead trial
    }


# ---------------------------------------------------------------- outputs


def _write_outputs(result: TuneResult, study: optuna.Study, out: Path) -> None:
    from cadence.io import atomic_write_json, atomic_write_text

    header = (
        f"# best of study {result.study_name!r}: {result.metric} = {result.best_value:.6g}\n"
        f"# searched: {', '.join(f'{k}={v}' for k, v in result.best_params.items())}\n"
    )
    atomic_write_text(out / "best.yaml", header + dump_config(result.best_config))
    atomic_write_json(out / "tune.json", result.to_dict())
    from cadence.tune.sweep_plots import plot_study

    plot_study(result, study, out / "plots")
