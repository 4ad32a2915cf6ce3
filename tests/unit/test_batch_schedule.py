"""Batch-size ramp boundaries, LR scaling rules and micro-batch splitting."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from cadence.schedules import BatchRamp, split_micro
from cadence.schedules.batch import lr_exponent


def test_sizes_at_stage_boundaries() -> None:
    ramp = BatchRamp(32, [(0.5, 64), (0.75, 128)], total_steps=100)
    expected = {0: 32, 49: 32, 50: 64, 74: 64, 75: 128, 99: 128, 500: 128}
    assert {t: ramp.size_at(t) for t in expected} == expected
    assert ramp.stage_starts == (50, 75)
    assert ramp.max_size == 128


@pytest.mark.parametrize(
    ("total", "fraction"), [(10, 0.3), (10, 0.7), (1000, 0.1), (7, 0.5), (3, 0.2), (100, 0.29)]
)
def test_stage_starts_at_first_step_reaching_fraction(total: int, fraction: float) -> None:
    ramp = BatchRamp(8, [(fraction, 16)], total_steps=total)
    # The first step with t >= fraction * total for the decimal the user wrote (0.3 means 3/10,
    # not the binary double just above it), computed with exact rationals.
    start = math.ceil(Fraction(repr(fraction)) * total)
    assert ramp.size_at(start) == 16
    assert start == 0 or ramp.size_at(start - 1) == 8


def test_stage_at_fraction_zero_overrides_base() -> None:
    ramp = BatchRamp(8, [(0.0, 16)], total_steps=10)
    assert [ramp.size_at(t) for t in range(10)] == [16] * 10


def test_no_stages_is_constant() -> None:
    ramp = BatchRamp(8, total_steps=10)
    assert all(ramp.size_at(t) == 8 and ramp.lr_scale_at(t) == 1.0 for t in range(20))


@pytest.mark.parametrize(
    ("rule", "scale"), [("sqrt", math.sqrt), ("linear", lambda r: r), ("none", lambda r: 1.0)]
)
def test_lr_scaling_rules(rule: str, scale) -> None:
    ramp = BatchRamp(32, [(0.25, 64), (0.5, 96), (0.75, 512)], total_steps=40, rule=rule)
    for t in range(45):
        assert ramp.lr_scale_at(t) == pytest.approx(scale(ramp.size_at(t) / 32), rel=1e-15)
    assert ramp.lr_scale_at(0) == 1.0


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.6, 1.0, 1.5, 2])
def test_lr_scaling_exponent_is_the_power_law(alpha: float) -> None:
    # modded-nanogpt couples LR to batch as (B/B0)^alpha with alpha ~0.5-0.6
    ramp = BatchRamp(16, [(0.2, 24), (0.4, 64), (0.7, 256)], total_steps=50, rule=alpha)
    for t in range(50):
        assert ramp.lr_scale_at(t) == pytest.approx((ramp.size_at(t) / 16) ** alpha, rel=1e-14)
    assert ramp.lr_scale_at(49) == pytest.approx(16.0**alpha)


@pytest.mark.parametrize(("rule", "alpha"), [("sqrt", 0.5), ("linear", 1.0), ("none", 0.0)])
def test_named_rules_are_their_exponents(rule: str, alpha: float) -> None:
    stages = [(0.25, 48), (0.5, 80), (0.75, 200)]
    named = BatchRamp(32, stages, total_steps=40, rule=rule)
    numeric = BatchRamp(32, stages, total_steps=40, rule=alpha)
    assert lr_exponent(rule) == alpha
    assert [named.lr_scale_at(t) for t in range(40)] == [numeric.lr_scale_at(t) for t in range(40)]


@pytest.mark.parametrize("bad", [-0.1, 2.5, True, "half"])
def test_bad_exponents_name_the_key(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^batch\.lr_scaling: "):
        BatchRamp(32, total_steps=10, rule=bad)  # type: ignore[arg-type]


def test_integral_float_sizes_from_yaml_are_accepted() -> None:
    ramp = BatchRamp(8, [[0.5, 16.0]], total_steps=10)  # type: ignore[list-item]
    assert ramp.size_at(5) == 16
    assert isinstance(ramp.size_at(5), int)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"stages": [(0.5, 64), (0.5, 128)]}, "batch.schedule"),
        ({"stages": [(0.6, 64), (0.5, 128)]}, "batch.schedule"),
        ({"stages": [(1.0, 64)]}, "batch.schedule"),
        ({"stages": [(-0.1, 64)]}, "batch.schedule"),
        ({"stages": [(0.5, 0)]}, "batch.schedule"),
        ({"stages": [(0.5, 1.5)]}, "batch.schedule"),
        ({"stages": [(0.5,)]}, "batch.schedule"),
        ({"rule": "cubic"}, "batch.lr_scaling"),
        ({"base_size": 0}, "batch.size"),
        ({"total_steps": 0}, "train.max_steps"),
    ],
)
def test_bad_ramps_name_the_key(kwargs: dict, key: str) -> None:
    args = {"base_size": 32, "stages": (), "total_steps": 100, **kwargs}
    with pytest.raises(ValueError, match="^" + key.replace(".", r"\.")):
        BatchRamp(args.pop("base_size"), args.pop("stages"), **args)


@pytest.mark.parametrize(
    ("global_size", "micro", "expected"),
    [
        (10, 3, [3, 3, 3, 1]),
        (12, 4, [4, 4, 4]),
        (10, None, [10]),
        (10, 10, [10]),
        (10, 64, [10]),
        (1, 1, [1]),
        (7, 1, [1] * 7),
    ],
)
def test_split_micro_table(global_size: int, micro: int | None, expected: list[int]) -> None:
    assert split_micro(global_size, micro) == expected


def test_split_micro_partitions_every_global_batch() -> None:
    for g in range(1, 70):
        for m in [None, *range(1, 75)]:
            parts = split_micro(g, m)
            assert sum(parts) == g
            assert all(p >= 1 for p in parts)
            if m is not None and m < g:
                assert all(p == m for p in parts[:-1]) and parts[-1] <= m
                assert len(parts) == math.ceil(g / m)


@pytest.mark.parametrize(
    ("global_size", "micro", "key"),
    [
        (10, 0, "batch.micro_size"),
        (10, -4, "batch.micro_size"),
        (10, 2.5, "batch.micro_size"),
        (0, 2, "batch.size"),
    ],
)
def test_split_micro_rejects_bad_sizes(global_size: int, micro: object, key: str) -> None:
    with pytest.raises(ValueError, match="^" + key.replace(".", r"\.")):
        split_micro(global_size, micro)  # type: ignore[arg-type]


# ---------------------------------------------------------------- batch.schedule: auto


def test_auto_ramp_doubles_when_the_critical_batch_reaches_the_next_size() -> None:
    from cadence.schedules import AutoBatchRamp

    ramp = AutoBatchRamp(8, 48, total_steps=100, rule="sqrt")
    assert ramp.propose(10, 15.9) is None  # B_crit below 2B = 16: stay
    assert ramp.propose(10, float("inf")) is None  # gradient lost in noise: no evidence
    assert ramp.propose(10, 16.0) == 16
    ramp.grow(10, 16)
    assert ramp.propose(20, 1000.0) == 32  # one doubling per measurement, however large
    ramp.grow(20, 32)
    assert ramp.propose(30, 1000.0) == 48  # the last step stops at max_size
    ramp.grow(30, 48)
    assert ramp.propose(40, 1e9) is None
    sizes = {0: 8, 9: 8, 10: 16, 19: 16, 20: 32, 30: 48, 99: 48}
    assert {t: ramp.size_at(t) for t in sizes} == sizes
    for t, b in sizes.items():
        assert ramp.lr_scale_at(t) == math.sqrt(b / 8)
    assert ramp.max_size == 48 and ramp.stage_starts == ()


def test_auto_ramp_never_shrinks_and_a_regrow_replaces_later_decisions() -> None:
    from cadence.schedules import AutoBatchRamp

    ramp = AutoBatchRamp(4, 64, total_steps=100)
    ramp.grow(5, 8)
    with pytest.raises(ValueError, match="does not grow"):
        ramp.grow(6, 8)
    ramp.grow(9, 16)
    ramp.grow(7, 16)  # after a rollback to step 7: what was decided after it is gone
    assert ramp.decisions == [(5, 8), (7, 16)]


def test_auto_ramp_max_size_must_hold_the_base_batch() -> None:
    from cadence.schedules import AutoBatchRamp

    with pytest.raises(ValueError, match=r"^batch\.max_size: must be an integer >= batch.size=8"):
        AutoBatchRamp(8, 4, total_steps=10)
