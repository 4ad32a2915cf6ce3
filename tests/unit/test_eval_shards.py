"""Validation under torch.distributed: each rank scores a share, and the shares add up.

A rank's share comes from `Workload._val_batches(world=...)`. The shares must cover every
validation example exactly once, in order, whatever the number of processes, and every rank must
yield the same number of batches (FSDP2 forwards are collectives). The metrics a single process
computes from all shares must equal its ordinary evaluation.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cadence.runtime.distributed import World
from cadence.workloads import ClassificationWorkload


def _workload(n_val: int) -> ClassificationWorkload:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_val, 3, generator=g), torch.randint(0, 4, (n_val,), generator=g)
    return ClassificationWorkload(nn.Linear(3, 4), x, y, x, y, eval_samples=None)


@pytest.mark.parametrize("n_val", [1, 5, 256, 257, 1000])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shards_cover_the_validation_set_once_with_equal_batch_counts(
    n_val: int, size: int
) -> None:
    w = _workload(n_val)
    batches = [list(w._val_batches(world=World(r, size))) for r in range(size)]
    assert len({len(b) for b in batches}) == 1
    seen = torch.cat([x for rank in batches for x, _ in rank])
    assert torch.equal(seen, w.x_val)


def test_shards_sum_to_the_single_process_metrics() -> None:
    w = _workload(1000)
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    whole = w.evaluate(model)
    loss = correct = 0.0
    with torch.no_grad():
        for r in range(3):
            for x, y in w._val_batches(world=World(r, 3)):
                logits = model(x)
                loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(-1) == y).sum())
    # Each batch's loss is summed in float32 and the shares cut different batches: equal to
    # float32 rounding (a few ulps of 2**-24 relative), not bit for bit.
    assert loss / 1000 == pytest.approx(whole["val_loss"], rel=1e-6)
    assert correct / 1000 == whole["val_accuracy"]
