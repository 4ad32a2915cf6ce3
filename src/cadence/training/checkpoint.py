"""Checkpoints: weights as safetensors, the rest as a weights-only torch file, written atomically.

Each checkpoint is a folder `step_XXXXXXXX/` built under a temporary name and renamed into place,
so a crash mid-save leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_model

from cadence.optim import is_schedule_free, set_train_mode

if TYPE_CHECKING:
    from cadence.training.trainer import Trainer

KEEP_LAST = 3


def trainer_state(trainer: Trainer) -> dict[str, Any]:
    """Everything besides the weights that a run needs to continue, with named keys."""
    state: dict[str, Any] = {
        "train_state": trainer.state.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "smoother": trainer.smoother.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
    }
    if trainer.plateau is not None:
        state["plateau"] = trainer.plateau.state_dict()
    if trainer.ema is not None:
        state["ema"] = trainer.ema.state_dict()
    if is_schedule_free(trainer.optimizer):
        # The iterate the optimizer steps from (y); the saved model holds the averaged x.
        state["train_weights"] = {
            k: v.detach().clone() for k, v in trainer.model.state_dict().items()
        }
    return state


def save_checkpoint(trainer: Trainer, root: Path, keep_last: int = KEEP_LAST) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{trainer.state.step:08d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state = trainer_state(trainer)
        set_train_mode(trainer.optimizer, False)  # checkpoints hold the averaged weights
        try:
            save_model(trainer.model, str(tmp / "model.safetensors"))
        finally:
            set_train_mode(trainer.optimizer, True)
        torch.save(state, tmp / "trainer.pt")
        for name in ("model.safetensors", "trainer.pt"):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep_last]:
        shutil.rmtree(old)
    return final
