"""The real Trainer satisfies TrainerView, the read-only type callbacks are handed.

Annotations are not checked at run time, so a Trainer that lost (or renamed) a member the
protocol promises would only fail inside some callback in a long run. Here every member is read
off a built Trainer and checked against the type the protocol names.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import pytest
from torch import nn

import cadence
from cadence.config import Config
from cadence.optim import AnyOptimizer
from cadence.runtime import TrainerView, World
from cadence.training import Trainer
from cadence.training.state import RunClock, TrainState
from cadence.workloads import Workload, build_workload

# member -> a check of the value the built Trainer gives for it (methods: of what they return)
EXPECTED = {
    "cfg": lambda v: isinstance(v, Config),
    "state": lambda v: isinstance(v, TrainState),
    "world": lambda v: isinstance(v, World),
    "run_dir": lambda v: v is None,  # built without a run directory
    "model": lambda v: isinstance(v, nn.Module),
    "workload": lambda v: isinstance(v, Workload),
    "optimizer": lambda v: isinstance(v, AnyOptimizer),
    "autocast": lambda v: isinstance(v(), AbstractContextManager),
    "clock": lambda v: isinstance(v, RunClock),
    "stopping": lambda v: v is False,
    "inspection": lambda v: v is None,  # no step inspected (train.inspect_every off)
    "batch_size": lambda v: isinstance(v(), int) and v() == 16,
    "log_metrics": callable,
    "averaged_weights": lambda v: isinstance(v(), AbstractContextManager),
}


def _members() -> set[str]:
    return {name for name in vars(TrainerView) if not name.startswith("_")}


@pytest.fixture(scope="module")
def trainer() -> Trainer:
    cfg = cadence.load_config(
        "sgd-logreg", ["batch.size=16", "train.max_steps=2", "train.progress=false"]
    )
    return Trainer(cfg, build_workload(cfg))


def test_every_member_is_checked_here() -> None:
    assert _members() == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_built_trainer_has_the_member_with_its_type(trainer: Trainer, name: str) -> None:
    assert EXPECTED[name](getattr(trainer, name)), name


def test_the_trainer_is_a_trainer_view(trainer: Trainer) -> None:
    assert isinstance(trainer, TrainerView)


def test_an_object_missing_a_member_is_not_a_trainer_view(trainer: Trainer) -> None:
    class Partial:
        def __init__(self) -> None:
            for name in _members() - {"log_metrics"}:
                setattr(self, name, getattr(trainer, name))

    assert not isinstance(Partial(), TrainerView)
