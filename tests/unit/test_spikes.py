"""The spike rule and the layer it names, as pure functions (training/spikes.py)."""

from __future__ import annotations

import statistics

import pytest

from cadence.training.spikes import (
    MAD_TO_SIGMA,
    MIN_HISTORY,
    blame,
    describe_spike,
    largest_rise,
    robust_z,
    rose_first,
)


def test_robust_z_is_the_distance_from_the_median_in_scaled_mads():
    history = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95] * 5
    med = statistics.median(history)
    mad = statistics.median(abs(x - med) for x in history)
    z, median = robust_z(history, 2.0, window=100)
    assert median == med
    assert z == pytest.approx((2.0 - med) / (MAD_TO_SIGMA * mad))


def test_one_outlier_in_the_window_barely_moves_the_rule():
    """The median and MAD ignore an earlier spike; a mean and deviation would double."""
    calm = [1.0, 1.1] * 15
    with_spike = [*calm[:-1], 50.0]
    assert robust_z(with_spike, 3.0, 100)[0] == pytest.approx(robust_z(calm, 3.0, 100)[0], rel=0.2)


def test_too_little_history_and_a_flat_loss():
    assert robust_z([1.0] * (MIN_HISTORY - 1), 9.0, 100) is None
    assert robust_z([1.0] * 5, 9.0, window=5) is not None  # a window under MIN_HISTORY suffices
    # a loss that has not moved: the spread is a thousandth of the level, not zero
    z, _ = robust_z([2.0] * 30, 2.002, 100)
    assert z == pytest.approx(1.0)
    # only the last `window` losses count
    assert robust_z([100.0] * 50 + [1.0] * 20, 1.0, window=20)[1] == 1.0


def record(step: int, **ratios: float) -> dict:
    return {
        "step": step,
        "layers": {
            k: {"update_ratio": v, "grad_norm": v, "weight_norm": 1.0} for k, v in ratios.items()
        },
    }


def test_rose_first_compares_the_last_records_with_the_run_before_them():
    base = [record(s, a=1e-3, b=1e-3) for s in range(10, 60, 10)]
    # b rises at step 60, a only at 70: b rose first, by 4x
    window = [record(60, a=1e-3, b=4e-3), record(70, a=3e-3, b=5e-3), record(80, a=1e-3, b=1e-3)]
    assert rose_first(base + window) == ("b", 60, pytest.approx(4.0))
    assert rose_first(base + [record(60, a=1e-3, b=1.5e-3)] * 3) is None
    # large early updates are baseline, not a rise: too few records to judge -> None
    assert rose_first(window) is None


def test_blame_falls_back_to_the_gradient_at_the_spike():
    ratios = {"a": 0.1, "b": 0.3}
    assert blame([], ratios)[0] == "b"  # no history: the largest ratio
    history = [record(s, a=0.01, b=0.5) for s in range(6)]  # b's gradients are always large
    layer, why = blame(history, ratios)
    assert layer == "a" and "10.0x its median" in why
    assert largest_rise({}) is None


def test_describe_spike_says_what_was_done():
    event = {"step": 1240, "loss": 7.5, "median": 2.0, "z": 9.34, "layer": "blocks.3"}
    event |= {"why": "update ratio rose first", "action": "rollback", "rolled_back_to": 1200}
    event |= {"skipped": [38400, 39744], "lr_scale": 0.5}
    assert describe_spike(event) == (
        "step 1,240: loss spike 7.5 (z = 9.3 above the median 2); blocks.3: update ratio rose "
        "first; rolled back to step 1,200, skipped samples 38,400-39,744, LR x 0.5"
    )
    assert describe_spike({**event, "action": "skip"}).endswith("; update skipped")


def test_a_rollback_keeps_the_runs_record_of_its_trouble():
    """Either kind of rollback (a non-finite step or a spike) goes through nonfinite.reload:
    counters come back from the checkpoint, the spikes, skips and rollbacks seen since do not."""
    from cadence.training.nonfinite import reload
    from cadence.training.state import TrainState

    saved = TrainState(step=20, samples=320, recent_losses=[1.0, 2.0]).state_dict()
    st = TrainState(step=29, samples=464, skipped_steps=2, rollbacks=1, lr_scale=0.5)
    st.spikes = [{"step": 25}]
    reload(st, "ckpt", lambda path: st.load_state_dict(saved), lr_factor=0.5)
    assert (st.step, st.samples, st.recent_losses) == (20, 320, [1.0, 2.0])
    assert (st.rollbacks, st.skipped_steps, st.lr_scale) == (2, 2, 0.25)
    assert st.spikes == [{"step": 25}]
