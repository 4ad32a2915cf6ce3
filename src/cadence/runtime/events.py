"""The small, fixed set of events a callback can observe.

Callbacks observe; they do not steer the loop. Stopping, the plateau controller and EMA are part
of the trainer's explicit state, so a run's behaviour never depends on which loggers are attached.
A callback may add values to the step's metrics row with ``trainer.log_metrics({...})``, and one
that keeps state across a resume names it with ``state_key`` and implements ``state_dict`` /
``load_state_dict``; the trainer's checkpoint then holds it under that name.
"""

from __future__ import annotations

from typing import Any


class Callback:
    """Override any subset. `row` is one metrics.jsonl record; scalars there are host floats."""

    state_key: str | None = None  # set to checkpoint this callback's state_dict() under it

    def on_start(self, trainer: Any) -> None: ...

    def on_step(self, trainer: Any) -> None:
        """An optimizer step was applied (`trainer.state.step` counts it)."""

    def on_log(self, trainer: Any, row: dict[str, Any]) -> None: ...

    def on_eval(self, trainer: Any, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, trainer: Any, path: str) -> None: ...

    def on_rewind(self, trainer: Any, step: int) -> None:
        """The run went back to `step` (a rollback after a non-finite loss)."""

    def on_end(self, trainer: Any, summary: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


EVENTS = ("on_start", "on_step", "on_log", "on_eval", "on_checkpoint", "on_rewind", "on_end")
