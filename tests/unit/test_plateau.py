"""Plateau multiplier vs torch ReduceLROnPlateau, floors, state round trips; EMA smoother."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from cadence.schedules import EMASmoother, Plateau

BASE_LR = 0.3


def torch_plateau(metrics: list[float], **kw: object) -> tuple[list[float], list[bool]]:
    """LR after each evaluation and whether that evaluation lowered it, according to torch."""
    min_scale = float(kw.pop("min_scale", 0.0))  # type: ignore[arg-type]
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=BASE_LR)
    # eps=0: torch skips reductions smaller than eps in absolute LR; Plateau has no such cutoff.
    sched = ReduceLROnPlateau(opt, min_lr=min_scale * BASE_LR, eps=0.0, **kw)  # type: ignore[arg-type]
    lrs, reduced = [], []
    for m in metrics:
        before = opt.param_groups[0]["lr"]
        sched.step(m)
        lrs.append(opt.param_groups[0]["lr"])
        reduced.append(lrs[-1] < before)
    return lrs, reduced


def ours(metrics: list[float], **kw: object) -> tuple[list[float], list[bool]]:
    p = Plateau(**kw)  # type: ignore[arg-type]
    lrs, reduced = [], []
    for m in metrics:
        reduced.append(p.update(m))
        lrs.append(BASE_LR * p.scale)
    return lrs, reduced


def _random_walk(seed: int, n: int = 120) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(np.abs(2.0 + np.cumsum(rng.normal(0.0, 0.05, n))).astype(float))


def _noisy_decay(seed: int, n: int = 120) -> list[float]:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    # Improves, then plateaus: the regime the rule is designed for.
    return list((1.0 / (1 + 0.2 * np.minimum(t, 40)) + rng.normal(0, 0.01, n)).astype(float))


SEQUENCES = {
    "flat": [1.0] * 40,
    "improving": [1.0 / (k + 1) for k in range(40)],
    "stalls": [5.0, 4.0, 3.0] + [3.0] * 10 + [2.0] + [2.0] * 10 + [2.5, 1.0] + [1.0] * 12,
    "tiny-gains": [1.0 - 1e-6 * k for k in range(40)],  # below the rel threshold: all bad
    "negative": [-1.0 - 0.001 * (k % 7) for k in range(40)],
    "walk-0": _random_walk(0),
    "walk-1": _random_walk(1),
    "decay-2": _noisy_decay(2),
    "decay-3": _noisy_decay(3),
}

CONFIGS = [
    dict(factor=0.5, patience=3, threshold=1e-4, threshold_mode="rel"),
    dict(factor=0.1, patience=0, threshold=1e-2, threshold_mode="rel"),
    dict(factor=0.5, patience=2, threshold=1e-3, threshold_mode="abs", cooldown=2),
    dict(factor=0.7, patience=1, threshold=0.0, threshold_mode="abs", cooldown=5),
    dict(factor=0.5, patience=3, threshold=1e-3, threshold_mode="rel", cooldown=1, mode="max"),
    dict(factor=0.3, patience=2, threshold=5e-3, threshold_mode="abs", mode="max"),
    dict(factor=0.5, patience=1, threshold=1e-4, cooldown=1, min_scale=0.1),
]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
@pytest.mark.parametrize("seq", list(SEQUENCES), ids=str)
def test_matches_torch_reduce_lr_on_plateau(config: dict, seq: str) -> None:
    metrics = SEQUENCES[seq]
    expected_lrs, expected_reduced = torch_plateau(metrics, **dict(config))
    got_lrs, got_reduced = ours(metrics, **config)
    assert got_reduced == expected_reduced
    for k, (a, b) in enumerate(zip(got_lrs, expected_lrs)):
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300), (k, a, b)


def test_handcrafted_patience_and_cooldown_timing() -> None:
    p = Plateau(factor=0.5, patience=2, cooldown=3, threshold=0.0, threshold_mode="abs")
    events = [p.update(m) for m in [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]
    # First eval sets best; three more bad ones exceed patience=2 -> reduce at index 3.
    # Cooldown holds the counter at 0 for 3 evals (4, 5, 6), then 3 bad evals (7, 8, 9).
    assert events == [False, False, False, True, False, False, False, False, False, True]
    assert p.scale == 0.25


def test_floor_is_respected_and_not_reported_as_reduction() -> None:
    p = Plateau(factor=0.5, patience=0, min_scale=0.2)
    flags = [p.update(1.0) for _ in range(10)]
    # Eval 0 sets best; evals 1, 2, 3 reduce to 0.5, 0.25, then the floor 0.2; then nothing.
    assert flags[:4] == [False, True, True, True]
    assert not any(flags[4:])
    assert p.scale == 0.2
    assert p.at_floor
    assert p.num_reductions == 3


def test_non_finite_metrics_count_as_bad() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        p = Plateau(patience=1)
        p.update(1.0)
        assert not p.update(bad)
        assert p.update(bad)
        assert p.best == 1.0
    p = Plateau(patience=0, mode="max")
    p.update(1.0)
    assert p.update(math.inf)
    assert p.best == 1.0


@pytest.mark.parametrize("split", [1, 7, 30, 77])
@pytest.mark.parametrize("config", CONFIGS[2:5])
def test_state_round_trip_continues_identically(split: int, config: dict) -> None:
    metrics = SEQUENCES["walk-1"]
    reference = Plateau(**config)
    ref_trace = [(reference.update(m), reference.scale) for m in metrics]

    first = Plateau(**config)
    for m in metrics[:split]:
        first.update(m)
    # Through JSON as well: checkpoints of the counters should be plain data.
    state = json.loads(json.dumps(first.state_dict()))
    assert {"scale", "best", "num_bad", "cooldown_left", "factor", "patience"} <= set(state)
    resumed = Plateau()  # default hyperparameters: the checkpoint's must win
    resumed.load_state_dict(copy.deepcopy(state))
    trace = [(resumed.update(m), resumed.scale) for m in metrics[split:]]
    assert trace == ref_trace[split:]
    assert resumed.state_dict() == reference.state_dict()


def test_load_state_dict_requires_counters() -> None:
    with pytest.raises(KeyError):
        Plateau().load_state_dict({"scale": 1.0})


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"factor": 1.0}, "plateau.factor"),
        ({"factor": 0.0}, "plateau.factor"),
        ({"patience": -1}, "plateau.patience"),
        ({"patience": 1.5}, "plateau.patience"),
        ({"threshold": -1e-3}, "plateau.threshold"),
        ({"threshold_mode": "relative"}, "plateau.threshold_mode"),
        ({"cooldown": -2}, "plateau.cooldown"),
        ({"min_scale": 1.5}, "plateau.min_scale"),
        ({"mode": "minimize"}, "plateau.mode"),
    ],
)
def test_bad_hyperparameters_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match="^" + key.replace(".", r"\.")):
        Plateau(**kwargs)


# ----------------------------------------------------------------------------- EMASmoother


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99])
def test_ema_is_bias_corrected_weighted_mean(beta: float) -> None:
    xs = _random_walk(4, 50)
    ema = EMASmoother(beta)
    for n in range(1, len(xs) + 1):
        got = ema.update(xs[n - 1])
        weights = [(1 - beta) * beta ** (n - 1 - i) for i in range(n)]
        expected = sum(w * x for w, x in zip(weights, xs[:n])) / sum(weights)
        assert math.isclose(got, expected, rel_tol=1e-10)
    # A constant input is reproduced exactly from the first step (that is the bias correction).
    const = EMASmoother(beta)
    assert all(math.isclose(const.update(3.0), 3.0, rel_tol=1e-12) for _ in range(20))


def test_ema_non_finite_passes_through_without_poisoning() -> None:
    ema = EMASmoother(0.9)
    assert math.isnan(ema.value)
    ema.update(2.0)
    assert math.isnan(ema.update(math.nan))
    assert ema.update(2.0) == pytest.approx(2.0)
    assert ema.count == 2


def test_ema_state_round_trip() -> None:
    xs = _random_walk(5, 30)
    a = EMASmoother(0.8)
    for x in xs[:10]:
        a.update(x)
    b = EMASmoother()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [b.update(x) for x in xs[10:]] == [a.update(x) for x in xs[10:]]


@pytest.mark.parametrize("beta", [1.0, -0.1])
def test_ema_rejects_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        EMASmoother(beta)


def test_ema_bad_beta_message_names_the_smoother_not_a_config_key() -> None:
    # The smoother's beta is not a config key (the trainer fixes it), so the message must not
    # point the user at a `plateau.ema_beta` setting that does not exist.
    ema = EMASmoother()
    for make in (
        lambda: EMASmoother(1.5),
        lambda: ema.load_state_dict({"beta": 2.0, "avg": 0, "count": 0}),
    ):
        with pytest.raises(ValueError) as info:
            make()
        message = str(info.value)
        assert "plateau.ema_beta" not in message
        assert message.startswith("EMASmoother")
