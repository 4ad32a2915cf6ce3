"""The small, fixed set of events a callback can observe.

Callbacks observe; they do not steer the loop. Stopping, the plateau controller and EMA are part
of the trainer's explicit state, so a run's behaviour never depends on which loggers are attached.
A callback may add values to the step's metrics row with ``trainer.log_metrics({...})``, and one
that keeps state across a resume names it with ``state_key`` and implements ``state_dict`` /
``load_state_dict``; the trainer's checkpoint then holds it under that name.
Every event hands the callback the trainer as a :class:`TrainerView`, which lists what it may read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager
    from pathlib import Path

    from torch import nn

    from cadence.config import Config
    from cadence.optim import AnyOptimizer
    from cadence.runtime.distributed import World
    from cadence.training.state import RunClock, TrainState
    from cadence.workloads import Workload


@runtime_checkable
class TrainerView(Protocol):
    """What a callback or helper may read from the trainer it is handed.

    A structural type, so that this leaf can name the trainer without importing training (which
    sits layers above it), and so that a callback's needs are written down: a member goes here
    only when something that receives the trainer reads it. Read-only by design: callbacks
    observe; the one write they get is ``log_metrics``.
    """

    @property
    def cfg(self) -> Config: ...  # the run's resolved config

    @property
    def state(self) -> TrainState: ...  # progress counters: step, samples, tokens, best so far

    @property
    def world(self) -> World: ...  # this process's place in torch.distributed (is_main, active)

    @property
    def run_dir(self) -> Path | None: ...  # where the run writes its files; None for none

    @property
    def model(self) -> nn.Module: ...  # the module being trained (unwrapped, maybe sharded)

    @property
    def workload(self) -> Workload: ...  # the data, loss and evaluation of the run

    @property
    def optimizer(self) -> AnyOptimizer: ...  # the optimizer stepping the model

    @property
    def autocast(self) -> Callable[[], AbstractContextManager[Any]]: ...  # the run's precision

    @property
    def clock(self) -> RunClock: ...  # the run's timers; time it excludes is not training

    @property
    def stopping(self) -> bool: ...  # a stop reason is set: the loop ends after this step

    @property
    def inspection(self) -> dict[str, Any] | None: ...  # this step's per-layer health record

    def batch_size(self) -> int: ...  # the global batch, in samples, of the current step

    def log_metrics(self, values: dict[str, Any]) -> None: ...  # add to this step's metrics row

    def averaged_weights(self) -> AbstractContextManager[Any]: ...  # the weights worth scoring


class Callback:
    """Override any subset. `row` is one metrics.jsonl record; scalars there are host floats."""

    state_key: str | None = None  # set to checkpoint this callback's state_dict() under it

    def on_start(self, trainer: TrainerView) -> None: ...

    def on_step(self, trainer: TrainerView) -> None:
        """An optimizer step was applied (`trainer.state.step` counts it)."""

    def on_log(self, trainer: TrainerView, row: dict[str, Any]) -> None: ...

    def on_eval(self, trainer: TrainerView, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, trainer: TrainerView, path: str) -> None: ...

    def on_rewind(self, trainer: TrainerView, step: int) -> None:
        """The run went back to `step` (a rollback after a non-finite loss)."""

    def on_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


EVENTS = ("on_start", "on_step", "on_log", "on_eval", "on_checkpoint", "on_rewind", "on_end")
