"""Optimizers whose update is not elementwise, on parameters FSDP2 has sharded.

Elementwise optimizers (SGD, the Adam family, Lion, schedule-free) update each shard on its own:
a DTensor op on matching shards is a local op, and the result is what one process would compute.
Two of cadence's optimizers look across a whole matrix, and get a subclass here that gathers what
they need. Both fall back to torch's own `step` when nothing is sharded, and keep torch's state
keys, so checkpoints move freely between sharded and unsharded runs.

## Muon: each matrix is orthogonalised whole

torch.optim.Muon's update has three parts. The momentum blend and the final parameter update
are elementwise, so on an FSDP2 shard (a DTensor split along dim 0) they are local and exact.
The Newton–Schulz orthogonalisation in between is not: it multiplies the *whole* matrix by its
transpose, and orthogonalising each row block alone would be a different (wrong) update. So the
sharded matrices are taken in rounds of W (the number of processes): each round all-gathers the
W blended updates, rank k orthogonalises the k-th whole matrix with torch's own Newton–Schulz,
and scatters its rows back to the ranks that own them.

What it costs, per step and per hidden matrix of shape m x n on W processes:
- communication: one all-gather of the m x n update (the bytes of the all-gather FSDP2 does for
  that weight in the forward pass) plus one scatter of the result (1/W of that per rank);
- compute: each matrix is orthogonalised once, by one rank (ns_steps iterations of three matmuls
  on min(m, n)-sized Gram matrices), so the work splits W ways as evenly as the matrix sizes
  allow. Orthogonalising every matrix on every rank would save the scatter but not scale: on
  this project's 2-core CPU benchmark Newton–Schulz is about half of a Muon step;
- memory: the whole update of one matrix per rank per round, plus the gather buffers.
The momentum buffer stays sharded like its parameter.

## Muon on CPU: Newton–Schulz in float32

torch's Newton–Schulz always runs in bfloat16, the right choice on accelerators with bf16
matrix units. A CPU without them (this project's CI machines: AMD EPYC, no AVX512-BF16) multiplies
bf16 matrices ~18x slower than float32 (256x256: 19.5 ms against 1.1 ms, measured 2026-12-05),
which made Muon's step 98% of a small MLP run's time. So `ns_dtype` chooses the precision: None
keeps torch's own step and bf16 iteration (the registry's choice on accelerators), float32 runs
the same quintic iteration, with the same coefficients, in float32 (its choice on CPU, where the
decision depends only on the device type, so a run reproduces on any CPU). The float32 iteration
is written here because torch's hard-codes the cast; a test checks both against the closed form
(the iteration is a polynomial of the singular values).

## Adafactor: the step runs on whole tensors

torch.optim.Adafactor factors the second moment of a matrix into row and column statistics; the
column statistics sum over rows that live on different ranks, and DTensor cannot run its in-place
norm updates on partial sums. Rather than re-derive Adafactor with explicit reductions, the step
runs torch's own Adafactor on whole tensors: every sharded parameter and its gradient are
all-gathered (twice the bytes of FSDP2's forward all-gather for that weight), torch's step updates
the whole copies on every rank, and each rank keeps its rows. The optimizer state is then whole
and replicated on every rank, which is cheap for exactly this optimizer: a factored matrix keeps
O(rows + columns) numbers (vectors keep one per element, but they are the small parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# torch's Newton–Schulz and LR adjustment, so the sharded path computes exactly what
# torch.optim.Muon computes (private helpers of the pinned torch; the test compares the two).
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

__all__ = ["ShardedAdafactor", "ShardedMuon", "is_sharded", "newton_schulz"]


def newton_schulz(
    g: Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Muon's orthogonalisation of a matrix: torch's own (bfloat16) when ``dtype`` is None or
    bfloat16, else the same iteration in ``dtype`` (see the module doc for why)."""
    if dtype is None or dtype == torch.bfloat16:
        return _zeropower_via_newtonschulz(g, coefficients, steps, eps)
    a, b, c = coefficients
    tall = g.size(0) > g.size(1)
    x = g.to(dtype).T if tall else g.to(dtype)
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def is_sharded(t: Tensor) -> bool:
    """A DTensor, i.e. a parameter FSDP2 has split across processes."""
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def _any_sharded(optimizer: torch.optim.Optimizer) -> bool:
    return any(is_sharded(p) for g in optimizer.param_groups for p in g["params"])


def _whole(t: Tensor) -> Tensor:
    return t.full_tensor() if is_sharded(t) else t


def _keep_own_rows(whole: Tensor, like: Tensor) -> Tensor:
    """This rank's part of a tensor every rank holds whole, cut locally (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


class _ShardedStep:
    """torch's own `step` when nothing is sharded (and `_own_step` allows); otherwise the
    closure once, then `_sharded_step`, which the subclass defines (mixed in before the torch
    optimizer)."""

    def _own_step(self) -> bool:
        """Whether torch's step computes what this optimizer wants, sharding aside."""
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self._own_step() and not _any_sharded(self):  # type: ignore[arg-type]
            return super().step(closure)  # type: ignore[misc]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sharded_step()
        return loss

    def _sharded_step(self) -> None:
        raise NotImplementedError


class ShardedMuon(_ShardedStep, torch.optim.Muon):
    """torch.optim.Muon that also accepts FSDP2-sharded (DTensor) matrices and orthogonalises in
    ``ns_dtype`` (None: torch's bfloat16); see module doc."""

    def __init__(self, params: Any, *args: Any, ns_dtype: torch.dtype | None = None, **kw: Any):
        super().__init__(params, *args, **kw)
        self.ns_dtype = None if ns_dtype == torch.bfloat16 else ns_dtype

    def _own_step(self) -> bool:
        return self.ns_dtype is None

    def _sharded_step(self) -> None:
        # The same list, in the same order, on every rank: the collectives below line up.
        work = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p, group in work:
            if not is_sharded(p):
                self._apply(p, group, self._ortho(self._blend(p, group), group))
        sharded = [(p, g) for p, g in work if is_sharded(p)]
        if not sharded:
            return
        from torch.distributed.tensor import distribute_tensor

        mesh = sharded[0][0].device_mesh
        if mesh.ndim != 1:
            raise NotImplementedError("ShardedMuon: only 1-D (FSDP) device meshes")
        size, me = mesh.size(), mesh.get_local_rank()
        ranks = mesh.mesh.flatten().tolist()
        for start in range(0, len(sharded), size):
            chunk = sharded[start : start + size]
            # All gathers first, then every rank orthogonalises its own matrix at the same
            # time: computing inside the gather loop would make the ranks take turns.
            own = None
            for k, (p, group) in enumerate(chunk):
                whole = self._blend(p, group).full_tensor()  # the all-gather
                if k == me:
                    own = (whole, group)
            mine = self._ortho(*own).contiguous() if own is not None else None
            for k, (p, group) in enumerate(chunk):
                dtype = self.ns_dtype or torch.bfloat16
                empty = torch.empty(p.shape, dtype=dtype, device=p.device)
                ortho = mine if k == me else empty
                rows = distribute_tensor(ortho, mesh, p.placements, src_data_rank=ranks[k])
                self._apply(p, group, rows)

    def _blend(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        """Momentum and Nesterov blend, elementwise: local to each shard."""
        grad, momentum = p.grad, group["momentum"]
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - momentum)
        return grad.lerp(buf, momentum) if group["nesterov"] else buf

    def _ortho(self, whole: Tensor, group: dict[str, Any]) -> Tensor:
        return newton_schulz(
            whole, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
        )

    @staticmethod
    def _apply(p: Tensor, group: dict[str, Any], ortho: Tensor) -> None:
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(ortho.to(p.dtype), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))


class ShardedAdafactor(_ShardedStep, torch.optim.Adafactor):
    """torch.optim.Adafactor that also accepts FSDP2-sharded parameters; see module doc."""

    def _sharded_step(self) -> None:
        # Every rank gathers the same tensors in the same order (the groups are identical).
        originals = [group["params"] for group in self.param_groups]
        try:
            for group in self.param_groups:
                group["params"] = [self._to_whole(p) for p in group["params"]]
            torch.optim.Adafactor.step(self)  # torch's step, on the whole tensors
        finally:
            for group, params in zip(self.param_groups, originals):
                for p, w in zip(params, group["params"]):
                    if w is not p:
                        if w in self.state:
                            self.state[p] = self.state.pop(w)
                        p.copy_(_keep_own_rows(w, p))
                group["params"] = params

    def _to_whole(self, p: Tensor) -> Tensor:
        if not is_sharded(p):
            return p
        w = p.full_tensor()
        if p.grad is not None:
            w.grad = p.grad.full_tensor()
        if p in self.state:  # state loaded from a sharded checkpoint may come back sharded
            self.state[w] = {k: _whole(v) for k, v in self.state.pop(p).items()}
        return w
