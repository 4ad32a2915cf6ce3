"""The Trainer's checkpoint interface: its whole state by name, and its weights.

checkpoint.py writes and reads checkpoints through these methods only (and sharded.py the FSDP
shards of the model, optimizer and EMA), so the on-disk format never depends on the trainer's
internals; a rollback after a non-finite step goes through the same path as a resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_model

from cadence.optim import is_schedule_free
from cadence.training import checkpoint
from cadence.training.rng import rng_state, set_rng_state

if TYPE_CHECKING:
    from cadence.training.trainer import Trainer


class Checkpointable:
    """Mixed into Trainer; every method reads or restores named parts of it."""

    def save_checkpoint(self: Trainer) -> Path | None:
        if self.run_dir is None:
            return None
        keep = self.cfg.train.keep_checkpoints
        # The run's time as of the save, not of the last step: a resumed run goes on from it,
        # and a time budget (which the schedules may follow) loses nothing across a restart.
        self.clock.tick()
        with self.clock.excluded("checkpoint"):
            path = checkpoint.save_checkpoint(self, self.run_dir / "checkpoints", keep_last=keep)
        if self.world.is_main:
            self.emit("on_checkpoint", str(path))
        return path

    @property
    def checkpoint_metric(self: Trainer) -> tuple[float | None, bool]:
        """(the last evaluation's metric, whether higher is better), for pruning checkpoints."""
        value = (self.last_metrics or {}).get(self.workload.metric)
        return value, self.workload.higher_is_better

    def save_weights(self: Trainer, path: Path) -> None:
        with self.averaged_weights():  # checkpoints hold the weights one would evaluate
            checkpoint.save_weights(self.model, path)

    def load_weights(self: Trainer, path: Path) -> None:
        load_model(self.model, str(path), device=str(self.device))

    def state_dict(self: Trainer) -> dict[str, Any]:
        """Everything besides the weights that a run needs to continue exactly, by name.

        Sharded (FSDP) runs keep the optimizer's and EMA's tensors in their DCP shards
        (sharded.py), not here."""
        state: dict[str, Any] = {
            "train_state": self.state.state_dict(),
            "smoother": self.rows.smoother.state_dict(),
            "rng": rng_state(),
            "callbacks": {
                cb.state_key: cb.state_dict() for cb in self.callbacks if cb.state_key is not None
            },
        }
        if self.plateau is not None:
            state["plateau"] = self.plateau.state_dict()
        if self.noise is not None:  # batch.schedule: auto: its measurements and decisions
            decisions = [list(d) for d in self.ramp.decisions]
            state["auto_batch"] = {**self.noise.state_dict(), "decisions": decisions}
        if not self.sharded:
            state["optimizer"] = self.optimizer.state_dict()
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
            if is_schedule_free(self.optimizer):
                # The iterate the optimizer steps from (y); model.safetensors holds the average x.
                state["train_weights"] = self.model.state_dict()
        return state

    def load_state_dict(self: Trainer, state: dict[str, Any]) -> None:
        """The inverse of `state_dict`, after the weights (or shards) have been loaded."""
        if "train_weights" in state:
            self.model.load_state_dict(state["train_weights"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.state.load_state_dict(state["train_state"])
        self.rows.smoother.load_state_dict(state["smoother"])
        if self.plateau is not None and "plateau" in state:
            self.plateau.load_state_dict(state["plateau"])
        saved = state.get("callbacks", {})
        if self.noise is not None:
            # (checkpoints written before the decision moved into the trainer kept it among the
            # callbacks, under the same name)
            auto = state.get("auto_batch") or saved["auto_batch"]
            self.noise.load_state_dict(auto)
            self.ramp.decisions = [(int(a), int(b)) for a, b in auto["decisions"]]
            self.noise.keep_until(self.state.step, self.run_dir, self.world)
        for cb in self.callbacks:
            if cb.state_key is not None and cb.state_key in saved:
                cb.load_state_dict(saved[cb.state_key])
        set_rng_state(state["rng"])
