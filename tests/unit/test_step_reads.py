"""Host syncs per step: one read of the device per step, one all-reduce under torch.distributed.

Counted, not timed: every way a tensor's value reaches Python (`tolist`, `item`, `float()`,
`int()`, `bool()`) is wrapped while the loop trains, evaluation excluded.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import cadence
from cadence.runtime.distributed import World
from cadence.training import Trainer, fit, read_step
from cadence.training import step as step_module
from cadence.workloads import build_workload

READS = ("tolist", "item", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def counting_reads(monkeypatch: pytest.MonkeyPatch):
    counter = {"n": 0, "on": True}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *args, _real=real, **kwargs):
            if counter["on"]:
                counter["n"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    yield counter
    monkeypatch.undo()


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["train.tol_rel_loss=1e-12", "train.tol_grad_norm=1e-12"],  # read from the same copy
        ["batch.micro_size=8", "train.clip_grad_norm=0.5"],
    ],
)
def test_one_host_read_per_step(monkeypatch, extra):
    steps = 12
    cfg = cadence.load_config(
        "sgd-logreg",
        [
            "batch.size=32",
            f"train.max_steps={steps}",
            "train.log_every=1",
            "train.eval_every=1000",
            "train.progress=false",
            *extra,
        ],
    )
    trainer = Trainer(cfg, build_workload(cfg))
    real_evaluate = trainer.evaluate
    with counting_reads(monkeypatch) as counter:

        def evaluate():  # evaluation reads its own sums; not part of a training step
            counter["on"] = False
            try:
                return real_evaluate()
            finally:
                counter["on"] = True

        trainer.evaluate = evaluate
        summary = fit(trainer)
    assert summary["steps"] == steps
    assert counter["n"] == steps


def test_the_distributed_read_is_one_all_reduce(monkeypatch):
    calls = []

    def all_reduce(tensor, op=None):
        calls.append(tensor.clone())
        tensor.mul_(2)  # two ranks holding the same values

    monkeypatch.setattr(step_module.dist, "all_reduce", all_reduce)
    world = World(rank=0, size=2, mode="ddp")
    loss, norm = torch.tensor(1.25), torch.tensor(3.0)
    read = read_step(loss, norm, world, signal=True, time_up=False)
    assert len(calls) == 1 and calls[0].tolist() == [1.25, 1.0, 0.0]
    assert (read.loss, read.grad_norm, read.signal, read.time_up) == (1.25, 3.0, True, False)
    quiet = read_step(loss, norm, world)
    assert len(calls) == 2 and not quiet.signal and not quiet.time_up
    alone = read_step(loss, norm, World(), signal=True)
    assert len(calls) == 2 and alone.signal  # one process: no collective at all
