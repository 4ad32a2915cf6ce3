"""Config -> workload: a built-in name, or ``package.module:function`` (the user's own).

``workload: my_package.my_module:build`` names a function that takes the config and returns a
workload (usually a :class:`cadence.DatasetWorkload`); the current directory is importable, so a
``build.py`` next to the config works as ``workload: build:make``. A path that does not import,
a missing function, or one that returns something else is a one-line ``ConfigError`` naming
``workload``.
"""

from __future__ import annotations

import importlib
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cadence.config import Config, ConfigError
from cadence.models.adapters import add_adapters
from cadence.models.hf import PREFIX, HFCausalLM, freeze_parameters
from cadence.optim.groups import output_parameter_ids
from cadence.workloads.builtin import WORKLOADS
from cadence.workloads.device import resolve_device  # also imported from here
from cadence.workloads.protocol import Workload


def is_import_path(name: str) -> bool:
    """``package.module:function`` (a user's workload) rather than a built-in name."""
    return ":" in name


def _import_builder(name: str) -> Callable[[Config], Workload]:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in module_name.split(".")):
        raise ConfigError(
            f"workload: {name!r} is not an import path; write package.module:function"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:  # `cadence` (a console script) does not put it there itself
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"workload: cannot import {module_name!r} ({exc}); run from the folder that holds "
            "it or put it on PYTHONPATH"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise ConfigError(
            f"workload: importing {module_name!r} raised {type(exc).__name__}: {_first(exc)}"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"workload: {module_name!r} has no function {attr!r}")
    return fn


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_config(cfg: Config) -> None:
    """The workload's rules on a config the config layer already accepted: a known workload,
    an architecture it has, a model shape its builder takes; for an import path, that it names
    a function. Raises a one-line ConfigError."""
    if is_import_path(cfg.workload):
        _import_builder(cfg.workload)
        return
    spec = WORKLOADS.get(cfg.workload)
    if spec is None:
        raise ConfigError(
            f"workload: unknown workload {cfg.workload!r}; choose one of: "
            f"{', '.join(WORKLOADS)}, or package.module:function for your own"
        )
    spec.check(cfg)


def build_workload(cfg: Config, tokenizer_dir: Path | None = None) -> Workload:
    """Seeded model init + data on the configured device.

    Python's and NumPy's global generators are seeded too: cadence draws from neither, but
    libraries it trains with do (PSGD-Kron draws its preconditioner balancing from NumPy's),
    and a run must not depend on what the process did before it.
    """
    check_config(cfg)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    if not is_import_path(cfg.workload):
        w = WORKLOADS[cfg.workload].build(cfg, device, tokenizer_dir)
        w.name = cfg.workload
        _adapt(w, cfg)
        _freeze(w, cfg)
        return w
    try:
        w = _import_builder(cfg.workload)(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's function failed: one line, exit 2
        raise ConfigError(
            f"workload: {cfg.workload} raised {type(exc).__name__}: {_first(exc)}"
        ) from None
    if not isinstance(w, Workload):
        raise ConfigError(
            f"workload: {cfg.workload} returned {type(w).__name__}, not a workload; return a "
            "cadence.DatasetWorkload (or a cadence.Workload)"
        )
    return prepare(w, cfg, name=cfg.workload)


def prepare(w: Workload, cfg: Config, name: str | None = None) -> Workload:
    """A workload from outside the registry, made ready for the config's run: its model on
    the configured device, its evaluation capped at ``train.eval_samples``, a name."""
    if cfg.train.activation_checkpointing and not hasattr(w.model, "set_activation_checkpointing"):
        raise ConfigError(
            f"train.activation_checkpointing: {type(w.model).__name__} has no "
            "set_activation_checkpointing(enabled) method; add one or set it to false"
        )
    w.model.to(resolve_device(cfg.train.device))
    _adapt(w, cfg)
    _freeze(w, cfg)
    w.limit_eval(cfg.train.eval_samples)
    w.name = w.name or name or "custom"
    return w


def adapt_model(model: nn.Module, cfg: Config) -> nn.Module:
    """``model.peft``: adapters injected into ``model`` in place (models/adapters.py), the rest
    frozen; the model itself. Training and `load_run` (before it merges them) both come here.

    Seeded apart from the model's own initialisation, so the base weights are those of the run
    without adapters and the adapters' (A random, B zero) depend on the seed alone.
    """
    if cfg.model.peft.method == "none":
        return model
    target = model.hf if isinstance(model, HFCausalLM) else model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + 1)
        try:
            add_adapters(target, cfg.model.peft, output_parameter_ids(model))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return model.to(next(model.parameters()).device)  # peft makes the adapters on the CPU


def _adapt(w: Workload, cfg: Config) -> None:
    adapt_model(w.model, cfg)


def _freeze(w: Workload, cfg: Config) -> None:
    """``model.freeze``: fixed parameters, named as the model itself names them."""
    if not cfg.model.freeze:
        return
    prefix = PREFIX if isinstance(w.model, HFCausalLM) else ""
    try:
        freeze_parameters(w.model, cfg.model.freeze, prefix)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
