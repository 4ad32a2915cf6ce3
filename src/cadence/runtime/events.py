"""The small, fixed set of events a callback can observe.

Callbacks observe; they do not steer the loop. Stopping, the plateau controller and EMA are part
of the trainer's explicit state, so a run's behaviour never depends on which loggers are attached.
"""

from __future__ import annotations

from typing import Any


class Callback:
    """Override any subset. `row` is one metrics.jsonl record; scalars there are host floats."""

    def on_start(self, trainer: Any) -> None: ...

    def on_log(self, trainer: Any, row: dict[str, Any]) -> None: ...

    def on_eval(self, trainer: Any, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, trainer: Any, path: str) -> None: ...

    def on_rewind(self, trainer: Any, step: int) -> None:
        """The run went back to `step` (a rollback after a non-finite loss)."""

    def on_end(self, trainer: Any, summary: dict[str, Any]) -> None: ...


EVENTS = ("on_start", "on_log", "on_eval", "on_checkpoint", "on_rewind", "on_end")
