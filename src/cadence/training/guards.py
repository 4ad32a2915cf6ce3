"""What the trainer does with a bad step before its update is applied, and data it skips.

Two kinds of bad step reach here from the step's host read: a non-finite loss or gradient
(``train.on_nonfinite``, policies in nonfinite.py) and a finite loss spike (``train.on_spike``,
detection in spikes.py). Both can drop the update or go back to the newest checkpoint; a
spike's rollback also jumps over the data that led to it, which is what the field does by hand
for large runs (restart shortly before the spike, skip the batches since). A run configured
from the start with ``train.skip_samples`` set to the same window trains exactly alike, so a
rollback is reproducible, and a user can skip data the same way after the fact.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadence.training import checkpoint, nonfinite
from cadence.training.batches import trained_tokens
from cadence.training.health import group_of
from cadence.training.spikes import blame, describe_spike, robust_z
from cadence.training.stopping import StopKind, StopReason

if TYPE_CHECKING:
    from cadence.training.step import StepRead
    from cadence.training.trainer import Trainer


class Guards:
    """Mixed into Trainer: the non-finite and spike policies, and ``train.skip_samples``."""

    def latest_checkpoint(self: Trainer) -> Path | None:
        """The newest valid checkpoint, as every rank agrees (None without a run directory)."""
        if self.run_dir is None:
            return None
        if self.writer is not None:
            self.writer.wait()  # the newest checkpoint may still be being written
        root = self.run_dir / "checkpoints"
        return checkpoint.agreed(lambda: checkpoint.latest_valid(root), self.world)[0]

    def handle_nonfinite(self: Trainer, size: int) -> None:
        t = self.cfg.train
        self.stop(
            nonfinite.handle_nonfinite(
                self.state,
                policy=t.on_nonfinite,
                size=size,
                tokens_per_sample=trained_tokens(self.workload, self.seq_len, self.position),
                rollback_lr_factor=t.rollback_lr_factor,
                latest_checkpoint=self.latest_checkpoint,
                restore=self.restore_verified,
            )
        )
        if t.on_nonfinite == "rollback" and not self.stopping:
            self.rewound()

    def restore_verified(self: Trainer, path: Path) -> None:
        """Back to a checkpoint that latest_checkpoint already verified."""
        checkpoint.restore(self, path, verified=True)

    def rewound(self: Trainer) -> None:
        """After a rollback: records of steps that no longer happened are dropped."""
        if self.health is not None:
            self.health.rewind(self.state.step)
        self.emit("on_rewind", self.state.step)

    def skip_data(self: Trainer) -> None:
        """``train.skip_samples``: a data position inside a window jumps to its end."""
        st = self.state
        for start, end in self.cfg.train.skip_samples or ():
            if start <= st.samples < end:
                st.samples = end

    def handle_spike(self: Trainer, read: StepRead, size: int) -> bool:
        """``train.on_spike`` for the step just read; True when its update must not be applied."""
        t, st = self.cfg.train, self.state
        if t.on_spike == "off":
            return False
        found = robust_z(st.recent_losses, read.loss, t.spike_window)
        if found is None or found[0] <= t.spike_z:
            _remember(st.recent_losses, read.loss, t.spike_window)
            return False
        z, median = found
        history = self.health.history if self.health is not None else []
        layer, why = blame(history, self.gradient_ratios())
        event: dict[str, Any] = {
            "step": st.step + 1,
            "loss": read.loss,
            "median": median,
            "z": z,
            "action": t.on_spike,
            "layer": layer,
            "why": why,
        }
        if t.on_spike == "warn":  # recorded; the loss joins the window (a new level becomes normal)
            _remember(st.recent_losses, read.loss, t.spike_window)
            self.record_spike(event)
            return False
        if st.consecutive_skips + 1 >= nonfinite.MAX_CONSECUTIVE_SKIPS:
            event["action"] = "stop"
            self.record_spike(event)
            self.stop(
                StopReason(StopKind.SPIKE, st.step + 1, f"{st.consecutive_skips + 1} in a row")
            )
            return True
        if t.on_spike == "rollback" and self.roll_back(event, size):
            return True
        event["action"] = "skip"  # rollback without a checkpoint (yet) or rollbacks left skips
        tokens = trained_tokens(self.workload, self.seq_len, self.position)
        nonfinite.drop_batch(st, size, tokens)
        self.record_spike(event)
        return True

    def roll_back(self: Trainer, event: dict[str, Any], size: int) -> bool:
        """Back to the newest checkpoint, past the data since it (the spike's batch included),
        with the LR lowered; False where there is no checkpoint or no rollback left."""
        st = self.state
        path = self.latest_checkpoint()
        if path is None or st.rollbacks >= nonfinite.MAX_ROLLBACKS:
            return False
        end = st.samples + size
        nonfinite.reload(st, path, self.restore_verified, self.cfg.train.rollback_lr_factor)
        event.update(rolled_back_to=st.step, skipped=[st.samples, end], lr_scale=st.lr_scale)
        st.samples = end
        self.record_spike(event)
        self.rewound()
        return True

    def record_spike(self: Trainer, event: dict[str, Any]) -> None:
        """In the run's state (summary.json), the next metrics row and one line on stderr."""
        self.state.spikes.append(event)
        self.log_metrics({"spike_step": event["step"], "spike_z": event["z"]})
        if self.world.is_main:
            print(f"cadence: {describe_spike(event)}", file=sys.stderr, flush=True)

    def gradient_ratios(self: Trainer) -> dict[str, float]:
        """||g|| / ||w|| per layer group for the gradient just computed (a spike's): which
        layer the spike's gradient hit hardest. Whole tensors only (not FSDP2 shards)."""
        sums: dict[str, list[float]] = {}
        for name, p in self.model.named_parameters():
            if p.grad is None or hasattr(p.grad, "to_local"):
                continue
            acc = sums.setdefault(group_of(name), [0.0, 0.0])
            acc[0] += float(p.grad.detach().float().pow(2).sum())
            acc[1] += float(p.detach().float().pow(2).sum())
        return {k: (g / w) ** 0.5 for k, (g, w) in sums.items() if w > 0}


def _remember(losses: list[float], loss: float, window: int) -> None:
    losses.append(loss)
    del losses[:-window]
