"""cadence: train PyTorch models with principled strategies and optimizers, and ship the result.

The public API: `load_config` builds a validated config from a recipe or YAML file plus
`KEY=VALUE` overrides (checked against its workload too); `train` runs it and returns the
summary; `resume` continues a run directory. `Callback` is the protocol for observing a run;
`DatasetWorkload` trains your own module and datasets (`Workload` is the protocol behind it).

Names are resolved on first use, so importing one part (``cadence.schedules``, ``cadence.optim``)
does not import the trainer and everything above it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "cadence.config",
    "ConfigError": "cadence.config",
    "ConfigWarning": "cadence.config",
    "load_config": "cadence.run",
    "train": "cadence.run",
    "resume": "cadence.run",
    "Callback": "cadence.runtime",
    "StopReason": "cadence.training",
    "Workload": "cadence.workloads",
    "DatasetWorkload": "cadence.workloads",
}

__all__ = [
    "Callback",
    "Config",
    "ConfigError",
    "ConfigWarning",
    "DatasetWorkload",
    "StopReason",
    "Workload",
    "__version__",
    "load_config",
    "resume",
    "train",
]

if TYPE_CHECKING:
    from cadence.config import Config, ConfigError, ConfigWarning
    from cadence.run import load_config, resume, train
    from cadence.runtime import Callback
    from cadence.training import StopReason
    from cadence.workloads import DatasetWorkload, Workload


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cadence' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
