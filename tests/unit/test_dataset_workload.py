"""`cadence.DatasetWorkload` against the plain computations it stands for.

The loss it hands the trainer is a sum over samples, so accumulation over micro-batches of any
sizes gives the gradient of the whole batch; its evaluation equals the metrics computed by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import cadence
from cadence.runtime.distributed import World
from cadence.training import accumulate_gradients


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def _workload(**kwargs) -> cadence.DatasetWorkload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    return cadence.DatasetWorkload(model, _data(40, 0), _data(23, 1), F.cross_entropy, **kwargs)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_accumulated_micro_batches_give_the_whole_batch_gradient():
    w = _workload()
    idx = torch.arange(3, 15)
    w.model.zero_grad()
    whole = w.batch(idx)
    loss = accumulate_gradients(w.model, w.loss_sum, [whole], w.units(whole))
    reference = _grads(w.model)
    x, y = w.train_set[idx.tolist()]
    assert loss.item() == pytest.approx(F.cross_entropy(w.model(x), y).item(), rel=1e-6)

    w.model.zero_grad()
    parts = [w.batch(idx[:5]), w.batch(idx[5:7]), w.batch(idx[7:])]
    accumulate_gradients(w.model, w.loss_sum, parts, sum(w.units(b) for b in parts))
    for a, b in zip(_grads(w.model), reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_an_empty_micro_batch_runs_forward_and_adds_nothing():
    w = _workload()
    empty = w.batch(torch.tensor([], dtype=torch.long))
    assert w.units(empty) == 0
    w.model.zero_grad()
    loss = w.loss_sum(w.model, empty)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in w.model.parameters())


def test_evaluation_equals_the_metrics_by_hand_and_respects_the_cap():
    w = _workload(metric="val_accuracy", eval_batch_size=7)
    assert (w.metric, w.higher_is_better, w.n_val) == ("val_accuracy", True, 23)
    x, y = w.val_set.tensors
    with torch.no_grad():
        out = w.model(x)
    got = w.evaluate(w.model)
    assert got["val_loss"] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)
    assert got["val_accuracy"] == (out.argmax(-1) == y).double().mean().item()
    w.limit_eval(10)
    got = w.evaluate(w.model)
    assert got["val_loss"] == pytest.approx(F.cross_entropy(out[:10], y[:10]).item(), rel=1e-6)


def test_ranks_share_the_evaluation_and_their_sums_make_the_whole(monkeypatch):
    """Each of two ranks scores its contiguous share; the all-reduced sums are the one-process
    result (the all-reduce is stood in for by summing the two ranks' partial sums)."""
    w = _workload(metric="val_accuracy", eval_batch_size=4)
    whole = w.evaluate(w.model)
    partial = []
    import cadence.workloads.dataset as ds

    monkeypatch.setattr(
        ds, "all_reduce_sums", lambda values, world: partial.append(values) or values
    )
    for rank in (0, 1):
        w.evaluate(w.model, World(rank=rank, size=2, mode="ddp"))
    sums = [a + b for a, b in zip(*partial)]
    assert sums[0] / w.n_val == pytest.approx(whole["val_loss"], rel=1e-6)
    assert sums[1] / w.n_val == whole["val_accuracy"]


def test_a_callable_metric_is_a_mean_over_samples_and_needs_a_direction():
    def within_one(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out.argmax(-1) - y).abs() <= 1).float().mean()

    with pytest.raises(ValueError, match="higher_is_better"):
        _workload(metric=within_one)
    w = _workload(metric=within_one, higher_is_better=True, eval_batch_size=5)
    assert w.metric == "val_within_one"
    x, y = w.val_set.tensors
    with torch.no_grad():
        expected = within_one(w.model(x), y).item()
    assert math.isclose(w.evaluate(w.model)["val_within_one"], expected, rel_tol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"metric": "val_f1"}, "metric must be"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(kwargs, error):
    with pytest.raises(ValueError, match=error):
        _workload(**kwargs)
    with pytest.raises(TypeError, match="nn.Module"):
        cadence.DatasetWorkload("model", _data(4, 0), _data(4, 1), F.cross_entropy)
    with pytest.raises(ValueError, match="val is empty"):
        cadence.DatasetWorkload(nn.Linear(5, 3), _data(4, 0), _data(0, 1), F.cross_entropy)
