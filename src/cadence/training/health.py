"""``train.inspect_every``: the health of each layer, measured on the steps the run trains anyway.

The global gradient norm says *that* something moved; a user asking "why did my run do that?"
needs to know *where*. Every N steps this records, for each layer group (a block of the
model, or a module outside the blocks):

- ``grad_norm``: the norm of the gradient the optimizer applies (after clipping);
- ``weight_norm``: the norm of the weights before the step;
- ``update_ratio``: ||Δw|| / ||w|| of the optimizer's actual step. It is the number the field
  watches (about 1e-3 is healthy for Adam-like optimizers); a layer whose ratio jumps is the
  first place to look before a loss spike;
- ``act_rms``: the RMS of the group's output in the step's forward passes (forward hooks);
- ``attn_entropy``: for attention layers that can say it (``attention_entropy``, as cadence's
  GPT does), the mean entropy of their attention distributions in nats: near 0, heads collapsed
  onto single tokens; near log(context), attention is uniform.

Nothing here changes the step: the hooks only read, the weights are copied before the update
and compared after, and no random number is drawn, so a run with inspection on trains exactly as
one without it. Under torch.distributed the sums of squares of sharded tensors (FSDP2) are
summed over processes and the activation statistics averaged, in one all-reduce per inspection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cadence.runtime.distributed import SINGLE, World

if TYPE_CHECKING:
    from cadence.training.trainer import Trainer

HISTORY = 50  # inspection records kept in memory for a spike's account
STATS = ("grad_norm", "weight_norm", "update_ratio", "act_rms", "attn_entropy")


def group_of(name: str) -> str:
    """The layer group a parameter (or module) name belongs to: the name up to its first
    numeric part (``blocks.3.attn.qkv.weight`` -> ``blocks.3``; a Llama's ``model.layers.3``),
    else its module (``tok_emb.weight`` -> ``tok_emb``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def _local(t: Tensor) -> Tensor:
    """A DTensor's shard on this process (FSDP2), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _sq(t: Tensor) -> Tensor:
    return _local(t).detach().float().pow(2).sum()


def _first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return getattr(out, "last_hidden_state", None)


class LayerHealth:
    """Per-layer statistics of one training step, every ``every`` steps."""

    def __init__(self, model: nn.Module, every: int, world: World = SINGLE) -> None:
        self.every, self.world = every, world
        self.groups: dict[str, list[Tensor]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.groups.setdefault(group_of(name), []).append(p)
        modules = dict(model.named_modules())
        self.modules = {g: modules[g] for g in self.groups if g in modules}
        # the outermost module that can say its attention entropy (a GPT block, whose hooks
        # run under per-block compilation, rather than the attention inside it)
        able = [n for n, m in modules.items() if callable(getattr(m, "attention_entropy", None))]
        outer = [n for n in able if not any(n.startswith(f"{o}.") for o in able if o != n)]
        self.attention = {group_of(n + ".x"): modules[n] for n in outer}
        self._acts: dict[str, list[tuple[Tensor, int]]] = {}  # (sum of squares, count)
        self._ents: dict[str, list[tuple[Tensor, int]]] = {}  # (sum of row entropies, rows)
        self.history: list[dict[str, Any]] = []  # the newest records, for a spike's account

    def rewind(self, step: int) -> None:
        """A rollback to ``step``: records past it describe steps that no longer happened."""
        self.history = [r for r in self.history if r["step"] <= step]

    def due(self, step: int) -> bool:
        """Whether the step about to be taken (``step`` = completed steps + 1) is inspected."""
        return step % self.every == 0

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Forward hooks for the activation statistics, on for the block it wraps only."""
        self._acts, self._ents = {}, {}
        handles = [m.register_forward_hook(self._act_hook(g)) for g, m in self.modules.items()]
        # before the forward: its inputs are all the entropy needs, and FSDP2 has gathered
        # the block's weights by then (a hook after it would find them resharded)
        handles += [
            m.register_forward_pre_hook(self._entropy_hook(g), with_kwargs=True)
            for g, m in self.attention.items()
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _act_hook(self, group: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            t = _first_tensor(out)
            if t is not None and t.is_floating_point():
                t = t.detach().float()
                self._acts.setdefault(group, []).append((t.pow(2).sum(), t.numel()))

        return hook

    def _entropy_hook(self, group: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            with torch.no_grad():
                rows = module.attention_entropy(*args, **kwargs).detach().float()
                self._ents.setdefault(group, []).append((rows.sum(), rows.numel()))

        return hook

    def step(self, optimizer_step: Callable[[], Any], step: int) -> dict[str, Any]:
        """Take the optimizer step, measuring around it; the step's record."""
        names = list(self.groups)
        params = [self.groups[g] for g in names]
        dev = params[0][0].device
        grads = [_total([_sq(p.grad) for p in ps if p.grad is not None], dev) for ps in params]
        before = [[_local(p).detach().clone() for p in ps] for ps in params]
        optimizer_step()
        weight, update = [], []
        for ps, olds in zip(params, before, strict=True):
            weight.append(_total([o.float().pow(2).sum() for o in olds], dev))
            update.append(
                _total(
                    [(_local(p).detach() - o).float().pow(2).sum() for p, o in zip(ps, olds)], dev
                )
            )
        # Activations as (sum, count) over every forward pass of the step on every process:
        # the mean comes out the same however the batch was split into micro-batches and ranks.
        seen = [_sum_count(store.get(g), dev) for store in (self._acts, self._ents) for g in names]
        parts = grads + weight + update + [s for s, _ in seen] + [c for _, c in seen]
        values = self._reduce(torch.stack(parts).double(), 3 * len(names)).tolist()
        k = len(names)
        layers: dict[str, dict[str, float]] = {}
        for i, g in enumerate(names):
            g2, w2, u2 = values[i], values[k + i], values[2 * k + i]
            row = {"grad_norm": g2**0.5, "weight_norm": w2**0.5}
            row["update_ratio"] = (u2 / w2) ** 0.5 if w2 > 0 else float("nan")
            for j, stat in ((i, "act_rms"), (k + i, "attn_entropy")):
                total, count = values[3 * k + j], values[5 * k + j]
                if count > 0:
                    row[stat] = (total / count) ** 0.5 if stat == "act_rms" else total / count
            layers[g] = row
        self._acts, self._ents = {}, {}
        record = {"step": step, "layers": layers}
        self.history = [*self.history[-(HISTORY - 1) :], record]
        return record

    def _reduce(self, values: Tensor, per_model: int) -> Tensor:
        """Summed over processes. The first ``per_model`` values are sums of squares of the
        model's tensors: FSDP2 shards add up to the whole, while DDP's whole tensors are the
        same on every process, so there the sum is divided back. The activations' sums and
        counts add up either way."""
        if not self.world.active:
            return values
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        if self.world.mode != "fsdp":
            values[:per_model] /= self.world.size
        return values


def _total(values: list[Tensor], device: torch.device) -> Tensor:
    return torch.stack(values).sum() if values else torch.zeros((), device=device)


def _sum_count(
    pairs: list[tuple[Tensor, int]] | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    if not pairs:
        return torch.zeros((), device=device), torch.zeros((), device=device)
    total = torch.stack([s.to(device) for s, _ in pairs]).sum()
    return total, torch.tensor(float(sum(n for _, n in pairs)), device=device)


class SharpnessProbe:
    """``train.sharpness_every``: the batch it measures on (the run's first, read once), so
    successive measurements differ by the weights alone."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.batch: tuple[list[Any], int] | None = None


class InspectDecisions:
    """Mixed into Trainer: the step's update, measured when ``train.inspect_every`` says so."""

    def watching(self: Trainer) -> contextlib.AbstractContextManager[Any]:
        """Around the step's forward and backward passes: hooks on an inspected step."""
        self.inspection = None
        health = self.health
        if health is None or not health.due(self.state.step + 1):
            return contextlib.nullcontext()
        return health.watching()

    def update(self: Trainer) -> None:
        """The optimizer step (measured on an inspected step)."""
        health = self.health
        if health is None or not health.due(self.state.step + 1):
            self.optimizer.step()
            return
        self.inspection = health.step(self.optimizer.step, self.state.step + 1)

    def measure_sharpness(self: Trainer) -> None:
        """On a ``train.sharpness_every`` step: the loss Hessian's top eigenvalue (and Adam's
        preconditioned one) on the run's first batch, in eval mode (no dropout draw), with the
        weights the step left; logged beside the optimizer's stability threshold. Its time is
        counted as evaluation, not training."""
        probe = self.sharpness
        if probe is None or self.state.step % probe.every:
            return
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from cadence.runtime.distributed import all_reduce_sums
        from cadence.training.sharpness import measure

        if probe.batch is None:
            probe.batch = self._read_batches(0, self.ramp.size_at(0))
        micro, units = probe.batch

        def loss() -> Tensor:
            # the math kernel: fused attention kernels have no double backward
            with sdpa_kernel(SDPBackend.MATH):
                parts = [self.workload.loss_sum(self.model, b) for b in micro if b is not None]
            return torch.stack(parts).sum() / (units / self.world.size)

        training = self.model.training
        self.model.eval()
        try:
            with self.clock.excluded("eval"):
                values = measure(loss, self.params, self.optimizer)
        finally:
            self.model.train(training)
        if self.world.active:  # each process measured its share of the batch: their mean
            keys = sorted(values)
            sums = all_reduce_sums([values[k] for k in keys], self.world)
            values = {k: v / self.world.size for k, v in zip(keys, sums, strict=True)}
        self.log_metrics(values)
