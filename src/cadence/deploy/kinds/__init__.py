"""The kinds of model cadence serves and exports, one module each, and their registry.

A run's workload declares its kind (:class:`cadence.workloads.ModelKind`); :func:`task_for`
gives the :class:`cadence.deploy.task.Task` that serves and exports it. Adding a kind is one
module here and one line in :data:`TASKS`.
"""

from __future__ import annotations

from cadence.deploy.kinds.asr import SpeechRecognitionTask
from cadence.deploy.kinds.classifier import ClassifierTask
from cadence.deploy.kinds.lm import LanguageModelTask
from cadence.deploy.rundir import LoadedRun
from cadence.deploy.task import Task
from cadence.workloads import ModelKind

__all__ = ["TASKS", "task_for"]

TASKS: dict[ModelKind, Task] = {
    ModelKind.LM: LanguageModelTask(),
    ModelKind.CLASSIFIER: ClassifierTask(),
    ModelKind.ASR: SpeechRecognitionTask(),
}


def task_for(run: LoadedRun) -> Task:
    """The task that serves and exports ``run``'s kind of model."""
    return TASKS[run.kind]
