"""metrics.jsonl: one JSON object per logged step, flushed as it is written."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cadence.io import atomic_path
from cadence.runtime.events import Callback, TrainerView


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; a diverged run still writes valid lines (as null).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class MetricsWriter(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._fh = None

    def on_start(self, trainer: TrainerView) -> None:
        self._open_at(trainer.state.step)

    def on_rewind(self, trainer: TrainerView, step: int) -> None:
        self._open_at(step)

    def _open_at(self, step: int) -> None:
        """Keep the rows up to `step` (a resumed or rolled-back run logs the rest again), so the
        file never holds a step twice; the rewrite is atomic."""
        if self._fh is not None:
            self._fh.close()
        self.rows = [r for r in read_metrics(self.path) if r["step"] <= step] if step else []
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        # Kept open for the whole run (closed in on_end) so each row is one cheap append.
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def on_log(self, trainer: TrainerView, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._fh.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._fh.flush()

    def on_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise
            # The last append was torn by a crash; a resumed run logs that step again.
    return rows


class InspectWriter(MetricsWriter):
    """inspect.jsonl (``train.inspect_every``): one record per inspected step, ``{"step": N,
    "layers": {group: {stat: value}}}``, kept in step with rollbacks and resumes as
    metrics.jsonl is."""

    def on_log(self, trainer: TrainerView, row: dict[str, Any]) -> None:
        pass  # its records come from the steps, not the metrics rows

    def on_step(self, trainer: TrainerView) -> None:
        if trainer.inspection is not None:
            super().on_log(trainer, trainer.inspection)
