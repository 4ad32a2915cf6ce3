"""Step-valued schedule keys as fractions of the run, and short runs that work.

A 20-step smoke run of the default recipe must train (its warmup is a fraction of the run); an
absolute warmup that only an override of train.max_steps made too long is clamped with one
warning; a warmup that is too long as written, or as set explicitly, is still refused.
"""

from __future__ import annotations

import warnings

import pytest

from cadence import load_config
from cadence.config import ConfigError, ConfigWarning
from cadence.config.parts import lr_schedule_from, steps_of
from cadence.schedules import build_schedule


def _no_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        return fn(*args)


def test_the_default_recipe_takes_a_short_run():
    cfg = _no_warnings(load_config, None, ["train.max_steps=20"])
    assert cfg.schedule.warmup == 0.1
    got = lr_schedule_from(cfg)
    want = build_schedule("cosine", total_steps=20, warmup=2, min_lr_ratio=0.1)
    assert [got(t) for t in range(25)] == [want(t) for t in range(25)]
    # The full-length run keeps the warmup it always had: 10% of 300 steps.
    full = lr_schedule_from(load_config())
    ref = build_schedule("cosine", total_steps=300, warmup=30, min_lr_ratio=0.1)
    assert [full(t) for t in range(300)] == [ref(t) for t in range(300)]


@pytest.mark.parametrize(
    "value, total, steps",
    [(0, 100, 0), (30, 100, 30), (0.0, 100, 0), (0.1, 300, 30), (0.1, 20, 2), (0.99, 20, 19)],
)
def test_steps_of_reads_ints_as_steps_and_floats_as_fractions(value, total, steps):
    assert steps_of(value, total, "schedule.warmup") == steps


def test_step_size_and_milestones_as_fractions(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    cfg = load_config(
        empty, ["schedule.name=step", "schedule.step_size=0.25", "train.max_steps=100"]
    )
    got, want = lr_schedule_from(cfg), build_schedule("step", total_steps=100, step_size=25)
    assert [got(t) for t in range(100)] == [want(t) for t in range(100)]
    cfg = load_config(
        empty, ["schedule.name=multistep", "schedule.milestones=[0.5, 80]", "train.max_steps=100"]
    )
    got = lr_schedule_from(cfg)
    want = build_schedule("multistep", total_steps=100, milestones=(50, 80))
    assert [got(t) for t in range(100)] == [want(t) for t in range(100)]


def test_an_override_of_max_steps_clamps_an_absolute_warmup_with_one_warning(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("schedule: {name: cosine, warmup: 30}\ntrain: {max_steps: 300}\n")
    with pytest.warns(ConfigWarning, match=r"^schedule\.warmup: 30 steps .* 19 steps") as seen:
        cfg = load_config(path, ["train.max_steps=20"])
    assert len(seen) == 1 and "\n" not in str(seen[0].message)
    assert cfg.schedule.warmup == 19
    assert _no_warnings(load_config, path, ["train.max_steps=31"]).schedule.warmup == 30


@pytest.mark.parametrize(
    "text, overrides",
    [
        ("schedule: {warmup: 30}\ntrain: {max_steps: 20}\n", []),  # wrong as written
        ("schedule: {warmup: 30}\ntrain: {max_steps: 20}\n", ["train.max_steps=10"]),
        ("train: {max_steps: 300}\n", ["train.max_steps=20", "schedule.warmup=50"]),  # explicit
        ("train: {max_steps: 300}\n", ["schedule.warmup=1.5"]),  # not a fraction
        ("train: {max_steps: 300}\n", ["schedule.warmup=-0.1"]),
    ],
)
def test_a_warmup_too_long_by_the_users_own_hand_is_refused(tmp_path, text, overrides):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"^schedule\.warmup: ") as info:
        _no_warnings(load_config, path, overrides)
    assert "\n" not in str(info.value)
