"""Validation-driven hyperparameter search with Optuna, pruning bad trials early.

Each trial is a real run: the config with the trial's values, the real :class:`Trainer` and
:func:`fit`, and a callback whose ``on_eval`` reports the validation loss to Optuna and raises
``optuna.TrialPruned`` when the pruner says so. ``fit`` has no ``try`` around the loop, so the
exception leaves ``Trainer.evaluate`` -> ``fit`` -> the objective, and Optuna records the trial as
pruned at the step it reached: a pruned trial costs only the steps it ran.

The search space is a mapping of dotted config keys to distributions, read from a ``search:``
section of the config YAML or from a separate file (``--space``)::

    optimizer.lr: {low: 1.0e-4, high: 1.0, log: true}     # float (log-uniform)
    optimizer.weight_decay: {low: 0.0, high: 0.1}          # float (uniform)
    schedule.warmup: {low: 0, high: 100, type: int}        # integer
    optimizer.name: [sgd, adamw]                           # categorical (a list is shorthand)
    optimizer.betas: {choices: [[0.9, 0.999], [0.9, 0.95]]}

A bad space is refused before any trial runs, with a one-line ``ConfigError`` naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cadence.config import Config, ConfigError, config_from_dict, dump_config, yaml_load
from cadence.training.events import Callback

if TYPE_CHECKING:
    import optuna

    from cadence.workloads import Workload

__all__ = [
    "PRUNERS",
    "Param",
    "PruningCallback",
    "TuneResult",
    "apply_params",
    "load_space",
    "parse_space",
    "run_sweep",
    "split_search_section",
]

PRUNERS = ("median", "halving", "hyperband", "none")


# ---------------------------------------------------------------- the search space


@dataclass(frozen=True)
class Param:
    """One searched config key: a float/int range or a list of choices."""

    key: str  # dotted config key, e.g. optimizer.lr
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        """Ask the trial for a value; list-valued choices travel as their index (Optuna stores
        only scalars) and come back as the list."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            step = int(self.step) if self.step else 1
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=step, log=self.log
            )
        if all(_scalar(c) for c in self.choices):
            return trial.suggest_categorical(self.key, list(self.choices))
        i = trial.suggest_categorical(self.key, list(range(len(self.choices))))
        return self.choices[i]

    def decode(self, value: Any) -> Any:
        """A stored trial value back to the config value (undoes the index encoding)."""
        if self.kind == "categorical" and not all(_scalar(c) for c in self.choices):
            return self.choices[int(value)]
        return value

    def samples(self) -> list[Any]:
        """Values at the edges of the space, checked against the config before any trial."""
        if self.kind == "categorical":
            return list(self.choices)
        return [self.low, self.high]


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return value


_SPEC_KEYS = {"type", "low", "high", "log", "step", "choices"}


def _parse_param(key: str, spec: Any) -> Param:
    where = f"search.{key}"
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where}: expected a list of choices or a mapping such as "
            "{low: 1.0e-4, high: 1.0, log: true}, got " + repr(spec)
        )
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown; allowed: {', '.join(sorted(_SPEC_KEYS))}"
        )
    if "choices" in spec:
        kind = spec.get("type", "categorical")
        choices = spec["choices"]
        if kind != "categorical" or set(spec) - {"choices", "type"}:
            raise ConfigError(f"{where}: 'choices' cannot be combined with low/high/log/step")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices: expected a non-empty list, got {choices!r}")
        return Param(key, "categorical", choices=tuple(_freeze(c) for c in choices))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: a range needs both low and high (or give choices)")
    low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
    is_int = isinstance(spec["low"], int) and isinstance(spec["high"], int)
    kind = spec.get("type", "int" if is_int and not spec.get("log") else "float")
    if kind not in ("float", "int"):
        raise ConfigError(f"{where}.type: expected float, int or categorical, got {kind!r}")
    if not low < high:
        raise ConfigError(f"{where}: need low < high, got low={low} and high={high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: expected true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got low={low}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, f"{where}.step")
        if step <= 0:
            raise ConfigError(f"{where}.step: must be > 0, got {step}")
        if log:
            raise ConfigError(f"{where}: step and log cannot be combined")
    if kind == "int":
        if low != int(low) or high != int(high):
            raise ConfigError(f"{where}: an int range needs integer low and high")
        if step is not None and step != int(step):
            raise ConfigError(f"{where}.step: an int range needs an integer step, got {step}")
    return Param(key, kind, float(low), float(high), log, step)


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def _thaw(v: Any) -> Any:
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


def _config_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted config key -> its annotation (to reject typos before any trial runs)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_config_keys(tp, key + "."))
        else:
            out[key] = tp
    return out


def parse_space(space: Any, base: Config | None = None) -> list[Param]:
    """Validate a search-space mapping into ``Param`` s; with ``base``, also check that every
    edge value of every parameter makes a valid config on its own."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(
            "search: expected a non-empty mapping of config keys to ranges, e.g. "
            "optimizer.lr: {low: 1.0e-4, high: 1.0, log: true}"
        )
    keys = _config_keys()
    params = []
    for key, spec in _flatten_space(space).items():
        if key not in keys:
            close = [k for k in keys if k.split(".")[-1] == key.split(".")[-1]]
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"search.{key}: not a config key{hint}")
        params.append(_parse_param(key, spec))
    if base is not None:
        for p in params:
            for value in p.samples():
                try:
                    apply_params(base, {p.key: _thaw(value)})
                except ConfigError as exc:
                    raise ConfigError(
                        f"search.{p.key}: value {value!r} is invalid: {exc}"
                    ) from None
    return params


def _flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Accept both ``optimizer.lr: ...`` and a section ``optimizer: {lr: ...}`` (one level)."""
    out: dict[str, Any] = {}
    for k, v in space.items():
        key = f"{prefix}{k}"
        if not prefix and "." not in key and isinstance(v, dict) and not (set(v) & _SPEC_KEYS):
            out.update(_flatten_space(v, key + "."))
        else:
            out[key] = v
    return out


def load_space(path: str | Path) -> dict[str, Any]:
    """Read a search-space YAML file (a mapping, or a mapping under ``search:``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--space {path}: file not found")
    try:
        data = yaml_load(p.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"--space {path}: invalid YAML; fix the syntax") from None
    if isinstance(data, dict) and set(data) == {"search"}:
        data = data["search"]
    if not isinstance(data, dict):
        raise ConfigError(f"--space {path}: expected a mapping of config keys to ranges")
    return data


def split_search_section(
    config: str | Path | None, overrides: Sequence[str], tmp_dir: Path
) -> tuple[Config, dict[str, Any] | None]:
    """Load CONFIG (recipe or YAML) + overrides; a ``search:`` section in a YAML file is taken
    out first (``load_config`` would reject it as an unknown key) and returned separately."""
    from cadence.config import load_config

    path = Path(str(config)) if config is not None else None
    if path is None or not path.is_file():
        return load_config(config, overrides), None
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError:
        data = None  # load_config reports the syntax error with its line
    if not isinstance(data, dict) or "search" not in data:
        return load_config(config, overrides), None
    space = data.pop("search")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    stripped = tmp_dir / path.name
    stripped.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(stripped, overrides), space


def apply_params(base: Config, values: dict[str, Any]) -> Config:
    """A validated copy of ``base`` with dotted keys set (raises ConfigError if invalid)."""
    data = copy.deepcopy(base.to_dict())
    for key, value in values.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = _thaw(value)
    return config_from_dict(data)


# ---------------------------------------------------------------- running trials


class PruningCallback(Callback):
    """Report each evaluation's metric to the trial; raise ``TrialPruned`` when told to."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.reports = 0

    def on_eval(self, trainer: Any, metrics: dict[str, float]) -> None:
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

    def _record(self, trainer: Any) -> None:
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
    trials: list[dict[str, Any]]  # number, state, params, value, steps, samples
    n_complete: int
    n_pruned: int
    n_failed: int
    total_steps: int  # optimizer steps over all trials of this invocation: the compute spent
    total_samples: int
    wall_time_s: float

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


def run_sweep(
    base: Config,
    space: dict[str, Any] | Sequence[Param],
    *,
    trials: int,
    out_dir: str | Path,
    storage: str | None = None,
    study_name: str | None = None,
    pruner: str = "median",
    metric: str = "val_loss",
    sampler_seed: int | None = None,
    on_trial: Callable[[dict[str, Any], int, int], None] | None = None,
) -> TuneResult:
    """Run ``trials`` more trials of a (possibly resumed) study and write the results.

    ``storage`` defaults to SQLite in ``out_dir`` (``study.db``); any Optuna RDB URL works, so
    several machines can share one study. ``study_name`` resumes that study when it exists.
    Writes ``best.yaml`` (ready for ``cadence train``), ``tune.json`` and ``plots/*.png``.
    """
    import optuna

    if trials < 1:
        raise ConfigError(f"--trials: must be >= 1, got {trials}")
    params = list(space) if not isinstance(space, dict) else parse_space(space, base)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study_name = study_name or f"cadence-{base.workload}"
    from cadence.workloads import WORKLOADS

    spec = WORKLOADS[base.workload]
    higher = spec.higher_is_better if metric == spec.metric else metric.endswith("accuracy")
    direction = "maximize" if higher else "minimize"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_startup = max(2, min(5, trials // 4))
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            direction=direction,
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(
                seed=base.train.seed if sampler_seed is None else sampler_seed,
                n_startup_trials=max(3, min(10, trials // 3)),
            ),
            pruner=make_pruner(pruner, base.train.eval_every, base.train.max_steps, n_startup),
        )
    except ValueError as exc:  # e.g. a resumed study with the other direction
        raise ConfigError(f"--study {study_name}: {exc}") from None
    except Exception as exc:  # bad URL, unreachable database
        raise ConfigError(f"--storage {storage}: cannot open the study ({exc})") from None
    study.set_user_attr("metric", metric)
    cache = _WorkloadCache()
    first = len(study.trials)
    t0 = time.perf_counter()

    def objective(trial: optuna.Trial) -> float:
        from cadence.training import Trainer, fit

        values = {p.key: p.suggest(trial) for p in params}
        cfg = apply_params(base, values)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))
        cb = PruningCallback(trial, metric)
        trainer = Trainer(cfg, cache.get(cfg), [cb])
        summary = fit(trainer)
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
        if on_trial is not None:
            on_trial(_trial_row(frozen, params), frozen.number - first + 1, trials)

    study.optimize(objective, n_trials=trials, callbacks=[report], catch=(ConfigError,))
    wall = time.perf_counter() - t0
    rows = [_trial_row(t, params) for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
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
    mine = rows[first:]
    result = TuneResult(
        study_name=study_name,
        storage=storage,
        metric=metric,
        direction=direction,
        best_value=float(best_trial.value),
        best_params={k: _thaw(v) for k, v in best_values.items()},
        best_config=best_cfg,
        trials=rows,
        n_complete=sum(r["state"] == "COMPLETE" for r in mine),
        n_pruned=sum(r["state"] == "PRUNED" for r in mine),
        n_failed=sum(r["state"] == "FAIL" for r in mine),
        total_steps=sum(r["steps"] or 0 for r in mine),
        total_samples=sum(r["samples"] or 0 for r in mine),
        wall_time_s=wall,
    )
    _write_outputs(result, study, out)
    return result


def _trial_row(t: optuna.trial.FrozenTrial, params: Sequence[Param]) -> dict[str, Any]:
    by_key = {p.key: p for p in params}
    return {
        "number": t.number,
        "state": t.state.name,
        "params": {
            k: _thaw(by_key[k].decode(v)) if k in by_key else v for k, v in t.params.items()
        },
        "value": t.value,
        "steps": t.user_attrs.get("steps"),
        "samples": t.user_attrs.get("samples"),
        "intermediate": {int(k): v for k, v in t.intermediate_values.items()},
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
