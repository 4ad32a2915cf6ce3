"""The run's horizon (cadence.config.horizon): a budget in samples or tokens as the step at which
it ends, held against a plain loop that lays the run out over each candidate horizon in turn and
counts what every step consumes."""

from __future__ import annotations

import math
import random
import warnings

import pytest

from cadence.config import Config, ConfigError, ConfigWarning
from cadence.config.horizon import Horizon, horizon
from cadence.config.validate import check_horizon
from cadence.schedules import BatchRamp, build_schedule
from cadence.schedules.seq_len import seq_len_schedule


def _cfg(**changes) -> Config:
    """A config with ``section__key=value`` changes (``workload=...`` at the top)."""
    cfg = Config()
    for key, value in changes.items():
        if "__" not in key:
            setattr(cfg, key, value)
            continue
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def reference_horizon(
    base: int,
    stages: list,
    max_steps: int,
    samples: int | None = None,
    tokens: int | None = None,
    per_sample: int = 0,
    seq_len: list | None = None,
    full: int = 16,
) -> int:
    """The smallest H for which the run laid out over H steps stops at step H, step by step."""
    for h in range(1, max_steps + 1):
        ramp = BatchRamp(base, stages, total_steps=h)
        seq = None if seq_len is None else seq_len_schedule(seq_len, full=full, keep="sequences",
                                                             total_steps=h)  # fmt: skip
        spent_samples = spent_tokens = 0
        for t in range(max_steps):  # the run goes on until a budget ends, wherever that is
            size = ramp.size_at(t)
            spent_samples += size
            spent_tokens += size * (per_sample if seq is None else seq.tokens_per_sample_at(t))
            over = (samples is not None and spent_samples >= samples) or (
                tokens is not None and spent_tokens >= tokens
            )
            if over or t + 1 == max_steps:
                break
        if t + 1 == h:  # the run stops where it was laid out to end
            return h
    return max_steps


def test_only_max_steps_is_the_horizon_it_always_was():
    h = horizon(_cfg(train__max_steps=300))
    assert (h.steps, h.budget, h.exact, h.time_s) == (300, "train.max_steps", True, None)
    assert h.position(17, 1e9) == 17  # no time budget: the schedules read the step
    assert h.summary() == {"horizon_steps": 300, "horizon_budget": "train.max_steps"}


@pytest.mark.parametrize(
    ("budget", "value", "steps"),
    [("max_samples", 96, 3), ("max_samples", 97, 4), ("max_tokens", 32 * 16 * 5, 5)],
)
def test_a_constant_batch_turns_a_budget_into_the_step_it_ends_at(budget, value, steps):
    cfg = _cfg(train__max_steps=10**6, batch__size=32, **{f"train__{budget}": value})
    h = horizon(cfg, n_train=1000, tokens_per_sample=16)
    assert (h.steps, h.budget) == (steps, f"train.{budget}")


def test_the_first_budget_to_end_wins_and_a_tie_goes_to_max_steps():
    cfg = _cfg(train__max_steps=4, train__max_samples=4 * 32, batch__size=32)
    assert horizon(cfg).budget == "train.max_steps"
    cfg.train.max_steps = 5
    assert (horizon(cfg).steps, horizon(cfg).budget) == (4, "train.max_samples")
    cfg.train.max_tokens = 3 * 32 * 128  # the lm's samples are model.seq_len = 128 tokens
    assert (horizon(cfg).steps, horizon(cfg).budget) == (3, "train.max_tokens")


def test_full_batch_spends_the_training_set_every_step():
    cfg = _cfg(batch__size="full", train__max_samples=1000, workload="logreg")
    assert horizon(cfg).pending == ("train.max_samples",)  # the config alone cannot count it
    assert horizon(cfg, n_train=300).steps == 4


@pytest.mark.parametrize("seed", range(40))
def test_a_staged_ramp_matches_a_plain_loop(seed):
    rng = random.Random(seed)
    fracs = sorted(rng.sample([0.1, 0.2, 0.25, 0.3, 0.5, 0.6, 0.75, 0.9, 0.95], rng.randint(1, 3)))
    sizes = sorted(rng.choice([4, 8, 12, 16, 32]) for _ in fracs)
    base = rng.choice([2, 4])
    stages = [[f, s] for f, s in zip(fracs, sizes, strict=True)]
    budget = rng.randint(1, 900)
    max_steps = rng.choice([60, 120])
    cfg = _cfg(batch__size=base, batch__schedule=stages, train__max_samples=budget,
               train__max_steps=max_steps)  # fmt: skip
    got = horizon(cfg)
    assert got.steps == reference_horizon(base, stages, max_steps, samples=budget)
    ramp = BatchRamp(base, stages, total_steps=got.steps)
    spent = [sum(ramp.size_at(t) for t in range(n)) for n in (got.steps - 1, got.steps)]
    if got.budget == "train.max_samples":  # laid out over H steps, the budget ends at step H
        assert spent[0] < budget <= spent[1]


@pytest.mark.parametrize("seed", range(25))
def test_a_ramp_and_a_sequence_length_warmup_in_tokens_match_a_plain_loop(seed):
    rng = random.Random(seed)
    stages = [[rng.choice([0.3, 0.5, 0.7]), rng.choice([8, 16])]]
    start = rng.choice([8, 16, 24])
    seq_len = [[0, start], [rng.choice([0.2, 0.5, 0.8]), 64]]
    budget = rng.randint(100, 40000)
    cfg = _cfg(batch__size=4, batch__schedule=stages, train__max_tokens=budget,
               train__max_steps=150, model__seq_len=64, schedule__seq_len=seq_len,
               schedule__seq_len_batch="sequences")  # fmt: skip
    want = reference_horizon(4, stages, 150, tokens=budget, seq_len=seq_len, full=64)
    assert horizon(cfg).steps == want


def test_a_ramp_that_shrinks_is_exact_or_refused():
    """No search is sound for a ramp that shrinks: whatever it returns must end exactly on
    its budget, checked step for step, or it says so in one line."""
    for budget in range(1, 400, 7):
        cfg = _cfg(batch__size=16, batch__schedule=[[0.5, 1]], train__max_samples=budget,
                   train__max_steps=100)  # fmt: skip
        try:
            h = horizon(cfg)
        except ConfigError as exc:
            assert "batch.schedule" in str(exc) and "\n" not in str(exc)
            continue
        ramp = BatchRamp(16, [[0.5, 1]], total_steps=h.steps)
        spent = sum(ramp.size_at(t) for t in range(h.steps - 1))
        assert spent < budget or h.budget == "train.max_steps"


def test_time_moves_the_position_only_when_it_is_ahead_of_the_step():
    h = Horizon(1000, "train.max_steps", time_s=100.0)
    assert h.position(10, 0.5) == 10  # the steps are ahead: they rule
    assert h.position(10, 50.0) == 500  # half the time budget: half the horizon
    assert h.position(10, 250.0) == 1000  # never past the horizon
    # a WSD cooldown over the last 20 % starts at 80 % of the time budget
    wsd = build_schedule("wsd", total_steps=1000, decay_fraction=0.2)
    assert h.position(3, 80.0) == wsd.decay_start == 800
    assert wsd(h.position(3, 79.9)) == 1.0 > wsd(h.position(3, 81.0))


def test_the_line_names_the_budget_that_ends_first_and_the_others():
    cfg = _cfg(train__max_steps=1000, train__max_tokens=750 * 32 * 128, batch__size=32,
               train__max_time_s=600.0)  # fmt: skip
    line = horizon(cfg).describe()
    assert line.startswith("horizon: step 750 (train.max_tokens=3072000 ends first; ")
    assert "train.max_steps=1000 would end later" in line and "train.max_time_s=600" in line
    assert "\n" not in line
    assert horizon(_cfg(train__max_steps=5)).describe() == "horizon: step 5 (train.max_steps=5)"


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"workload": "digits", "train__max_tokens": 1000}, "train.max_tokens"),
        ({"batch__schedule": "auto", "train__max_samples": 1000}, "train.max_samples"),
        ({"schedule__warmup": 100, "train__max_samples": 32 * 50}, "train.max_samples"),
        ({"train__max_tokens": 0}, "train.max_tokens"),
    ],
)
def test_a_budget_that_cannot_be_the_horizon_is_one_line(changes, key):
    cfg = _cfg(batch__size=32, **changes)
    with pytest.raises(ConfigError, match=rf"^{key}: ") as err:
        check_horizon(cfg)
    assert "\n" not in str(err.value)


def test_a_fractional_warmup_always_fits_the_horizon():
    cfg = _cfg(batch__size=32, schedule__name="cosine", schedule__warmup=0.1,
               train__max_samples=32 * 50)  # fmt: skip
    assert check_horizon(cfg).steps == 50


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"schedule__name": "multistep", "schedule__milestones": [10, 60]}, "schedule.milestones"),
        ({"schedule__name": "step", "schedule__step_size": 50}, "schedule.step_size"),
        ({"batch__schedule": [[0.99, 64]]}, "batch.schedule[0]"),
        ({"schedule__momentum": [[0, 0.8], [80, 0.95]], "optimizer__name": "sgd"},
         "schedule.momentum"),
    ],
)  # fmt: skip
def test_a_change_outside_the_run_is_one_warning(changes, needle):
    cfg = _cfg(batch__size=32, train__max_samples=32 * 50, **changes)
    with pytest.warns(ConfigWarning) as seen:
        check_horizon(cfg, warn=True)
    lines = [str(w.message) for w in seen if issubclass(w.category, ConfigWarning)]
    assert len(lines) == 1 and lines[0].startswith(needle) and "\n" not in lines[0]
    assert "step 50, train.max_samples" in lines[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_horizon(cfg)  # the config check itself stays quiet: the run warns once


def test_many_steps_cost_few_evaluations():
    """A million-step horizon with a ramp is counted by stretches, not step by step."""
    cfg = _cfg(batch__size=32, batch__schedule=[[0.5, 64]], train__max_steps=10**7,
               train__max_samples=32 * 500_000 + 64 * 500_000)  # fmt: skip
    assert horizon(cfg).steps == 10**6
    assert math.isclose(horizon(cfg).position(0, 0.0), 0)
