"""Counters and records of a run: everything the loop decides with, as one explicit state."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class TrainState:
    """Progress is counted in optimizer steps, samples and tokens; schedules read `step`."""

    step: int = 0  # completed optimizer steps
    samples: int = 0  # training samples consumed (also the data position)
    tokens: int = 0  # training tokens consumed (text workloads)
    elapsed_s: float = 0.0  # wall time of the loop so far, excluding start-up
    eval_time_s: float = 0.0  # part of elapsed_s spent evaluating
    checkpoint_time_s: float = 0.0  # part of elapsed_s spent writing checkpoints
    train_time_s: float = 0.0  # elapsed_s minus the two above, as of the last completed step
    best_metric: float | None = None  # best validation metric so far
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0  # for early stopping
    target_step: int | None = None  # first step at which train.target was reached
    last_train_loss: float | None = None  # last loss read back from the device
    skipped_steps: int = 0  # updates dropped because the loss or gradient was not finite
    consecutive_skips: int = 0  # non-finite steps in a row (a run that only skips is stuck)
    rollbacks: int = 0  # reloads of the last checkpoint after a non-finite step
    lr_scale: float = 1.0  # LR multiplier lowered by each rollback
    prev_loss: float | None = None  # previous step's loss, for the tol_rel_loss criterion
    stop_reason: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        unknown = set(state) - names
        if unknown:
            raise KeyError(f"unknown train-state keys: {sorted(unknown)}")
        for key, value in state.items():
            setattr(self, key, value)
