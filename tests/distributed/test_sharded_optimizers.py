"""Every optimizer on FSDP2 shards against the same optimizer on whole tensors, bit for bit.

Two gloo processes hold an FSDP2-sharded tiny GPT (sharded per block, as the trainer does; row
counts that do not split evenly); the same model unsharded, in each process, is the reference.
Both ranks feed the same batch, so FSDP2's averaged gradient is exactly the whole-batch gradient
((g + g) / 2 == g in floating point) and every optimizer sees the same inputs in both runs:
elementwise ones update shards locally, Muon orthogonalises gathered matrices and Adafactor steps
gathered tensors (cadence.optim.sharded). Parameters must be *equal*, not close, after three steps.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cadence.cli.launch import launch
from cadence.models import GPT, GPTConfig
from cadence.optim import OPTIMIZERS, build_optimizer
from cadence.optim.sharded import ShardedMuon, is_sharded
from cadence.runtime.distributed import World, wrap

# d_model 24 and vocab 67: most matrices have a row count that two ranks split unevenly.
CONFIG = GPTConfig(vocab_size=67, seq_len=8, n_layer=2, n_head=2, d_model=24)
STEPS = 3
# those the config check lets run on FSDP2; the rest are refused there (tests/unit/test_config)
SHARDABLE = [name for name, spec in OPTIMIZERS.items() if spec.shardable]


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))


def _worker() -> None:
    """One rank's part."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for name in SHARDABLE:
            torch.manual_seed(0)
            reference = GPT(CONFIG)
            sharded = wrap(copy.deepcopy(reference), World(rank, world, 0, "fsdp"), "fp32")
            # fused=False: torch's fused Adam kernel rounds a tensor's elements differently by
            # their position in it (vector body vs scalar tail), so on a shard it can differ
            # from the whole tensor by an ulp (seen on Muon's AdamW half, then amplified by
            # Newton-Schulz); the per-element loop is what makes "equal" a fair demand here.
            kw = {
                "lr": 1e-2,
                "weight_decay": 0.1,
                "momentum": 0.0 if name == "gd" else 0.9,
                "fused": False,
            }
            ours, theirs = (
                build_optimizer(name, sharded, **kw),
                build_optimizer(name, reference, **kw),
            )
            g = torch.Generator().manual_seed(1)  # the same batches on every rank
            for _ in range(STEPS):
                tokens = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.seq_len + 1), generator=g)
                for model, opt in ((sharded, ours), (reference, theirs)):
                    opt.zero_grad()
                    _loss(model, tokens).backward()
                    opt.step()
            params = dict(reference.named_parameters())
            local = 0
            for pname, p in sharded.named_parameters():
                assert is_sharded(p), f"{name}: {pname} is not sharded"
                local += p.to_local().numel()
                assert torch.equal(p.full_tensor(), params[pname].detach()), f"{name}: {pname}"
            assert local < sum(q.numel() for q in params.values())
    finally:
        dist.destroy_process_group()


def _rank(argv: list[str]) -> None:
    """A rank's entry point for cadence's launcher (which passes the argument list)."""
    _worker()


def test_every_optimizer_on_fsdp2_shards_equals_it_on_whole_tensors() -> None:
    # torchrun's own agent and rendezvous, as `cadence train --nproc 2` launches them: the ranks
    # are forked from this process (a failed check is a rank's traceback and a non-zero status)
    assert launch(2, [], _rank) == 0


def test_orthogonalising_shards_separately_would_differ() -> None:
    # Why Muon gathers: Newton–Schulz of two row blocks is not the rows of Newton–Schulz of the
    # whole matrix (the Gram matrix couples all rows).
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.manual_seed(0)
    m = torch.randn(7, 5)
    args = ((3.4445, -4.7750, 2.0315), 5, 1e-7)
    whole = _zeropower_via_newtonschulz(m, *args)
    blocks = torch.cat([_zeropower_via_newtonschulz(b, *args) for b in m.chunk(2)])
    assert not torch.allclose(whole.float(), blocks.float(), atol=1e-2)


def test_unsharded_parameters_take_torch_muons_own_step() -> None:
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 7, bias=False)
    b = copy.deepcopy(a)
    hyper = {"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}
    ours, theirs = ShardedMuon(a.parameters(), **hyper), torch.optim.Muon(b.parameters(), **hyper)
    for p in (a.weight, b.weight):
        p.grad = torch.ones_like(p)
    ours.step()
    theirs.step()
    assert torch.equal(a.weight, b.weight)
