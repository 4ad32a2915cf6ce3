"""Workloads: data + model + loss + metric (+ target), the unit that is trained and compared.

protocol.py documents what the trainer needs (`Workload`); the built-in workloads (builtin.py,
on device tensors: tensors.py) and `DatasetWorkload` (a user's module and datasets: dataset.py)
implement it, and resolve.py turns ``workload:`` (a built-in name or ``package.module:function``)
into one.
"""

from cadence.workloads.builtin import (
    IN_FEATURES,
    WORKLOADS,
    WorkloadSpec,
    build_model,
    gpt_config,
    val_fraction,
)
from cadence.workloads.dataset import DatasetWorkload
from cadence.workloads.device import resolve_device
from cadence.workloads.protocol import ModelKind, Workload, val_ranges
from cadence.workloads.resolve import (
    adapt_model,
    build_workload,
    check_config,
    is_import_path,
    prepare,
)
from cadence.workloads.tensors import (
    ClassificationWorkload,
    LogRegWorkload,
    TensorWorkload,
)

__all__ = [
    "IN_FEATURES",
    "WORKLOADS",
    "ClassificationWorkload",
    "DatasetWorkload",
    "LogRegWorkload",
    "ModelKind",
    "TensorWorkload",
    "Workload",
    "WorkloadSpec",
    "adapt_model",
    "build_model",
    "build_workload",
    "check_config",
    "gpt_config",
    "is_import_path",
    "prepare",
    "resolve_device",
    "val_fraction",
    "val_ranges",
]
