"""Momentum and weight-decay schedules in the trainer.

References: a flat schedule is the constant hyper-parameter (bit for bit, per optimizer
family); the logged values are the closed form of the points. Resume across a schedule is in
test_resume.py (the "muon, scheduled momentum and decay" family).
"""

from __future__ import annotations

import numpy as np
import pytest
from trainer_helpers import run_fit

from cadence.config import ConfigError

pytestmark = pytest.mark.usefixtures("plots_off")

STEPS = 8
# (the constant setting, the flat schedule that must equal it)
FLAT = {
    "sgd": (
        ["optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9"],
        ["optimizer.name=sgd", "optimizer.lr=0.05", "schedule.momentum=[[0, 0.9]]"],
    ),
    "adamw": (
        ["optimizer.name=adamw", "optimizer.betas=[0.8, 0.999]"],
        ["optimizer.name=adamw", "schedule.momentum=[[0, 0.8]]"],
    ),
    "muon": (
        ["optimizer.name=muon", "optimizer.momentum=0.9"],
        ["optimizer.name=muon", "schedule.momentum=[[0, 0.9]]"],
    ),
    "lion": (
        ["optimizer.name=lion", "optimizer.lr=0.001", "optimizer.betas=[0.95, 0.99]"],
        [
            "optimizer.name=lion",
            "optimizer.lr=0.001",
            "optimizer.betas=[0.5, 0.99]",  # beta1 overwritten by the schedule, beta2 kept
            "schedule.momentum=[[0, 0.95]]",
        ],
    ),
    "schedulefree-adamw": (
        ["optimizer.name=schedulefree-adamw", "optimizer.betas=[0.8, 0.999]"],
        ["optimizer.name=schedulefree-adamw", "schedule.momentum=[[0, 0.8]]"],
    ),
    "adamw weight decay": (
        ["optimizer.name=adamw", "optimizer.weight_decay=0.05"],
        ["optimizer.name=adamw", "optimizer.weight_decay=0.1", "schedule.weight_decay=[[0, 0.5]]"],
    ),
}


def _weights(make_config, *overrides: str) -> dict:
    cfg = make_config(
        "digits", "model.hidden=[16,16]", f"train.max_steps={STEPS}", "train.eval_every=100",
        *overrides,
    )  # fmt: skip
    _, _, trainer = run_fit(cfg)
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("family", list(FLAT))
def test_a_flat_schedule_is_the_constant_setting_bit_for_bit(make_config, family) -> None:
    constant, scheduled = FLAT[family]
    a, b = _weights(make_config, *constant), _weights(make_config, *scheduled)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k


def test_logged_values_are_the_closed_form_of_the_points(make_config) -> None:
    steps, wd = 40, 0.1
    cfg = make_config(
        "digits",
        "optimizer.name=muon",
        "schedule.name=cosine",
        "schedule.warmup=4",
        "schedule.momentum=[[0, 0.85], [0.25, 0.95], [0.8, 0.95], [1.0, 0.85]]",
        f"optimizer.weight_decay={wd}",
        "schedule.weight_decay=lr",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.eval_every=100",
    )
    _, rows, _ = run_fit(cfg)
    t = np.array([r["step"] - 1 for r in rows])  # a row reports the step just taken
    expected = np.interp(t, [0, 10, 32, 40], [0.85, 0.95, 0.95, 0.85])
    np.testing.assert_allclose([r["momentum"] for r in rows], expected, atol=1e-15)
    lr = np.array([r["lr"] for r in rows]) / cfg.optimizer.lr
    np.testing.assert_allclose([r["weight_decay"] for r in rows], wd * lr, rtol=1e-12)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.name=adafactor", "schedule.momentum=[[0, 0.9]]"], "has no momentum"),
        (["optimizer.name=gd", "batch.size=full", "schedule.momentum=[[0, 0.9]]"], "no momentum"),
        (["optimizer.weight_decay=0.0", "schedule.weight_decay=lr"], "which is 0"),
        (["schedule.momentum=[[0, 1.2]]"], "must be in [0, 1)"),
        (["optimizer.weight_decay=0.1", "schedule.weight_decay=[[0, -1]]"], "in [0, inf]"),
    ],
)
def test_bad_schedules_are_refused_before_training(make_config, overrides, message) -> None:
    with pytest.raises(ConfigError, match=r"^schedule\.(momentum|weight_decay): ") as err:
        make_config("digits", *overrides)
    assert message in str(err.value)


# ---------------------------------------------------------------- sequence-length warmup


def _lm(make_config, *overrides: str):
    return make_config(
        "lm", "optimizer.name=adamw", "optimizer.lr=0.003", "schedule.name=constant",
        "batch.size=4", "train.max_steps=3", "train.log_every=1", "train.eval_every=100",
        *overrides,
    )  # fmt: skip


def test_seq_len_warmup_trains_as_a_plain_loop_over_the_cut_sequences(make_config) -> None:
    import torch
    import torch.nn.functional as F

    from cadence.config.parts import optimizer_from
    from cadence.workloads import build_workload

    # model.seq_len 16: steps 0 and 1 at length 8 (interp 8, 12 -> floored to 8), step 2 at 16
    cfg = _lm(make_config, "schedule.seq_len=[[0, 8], [2, 16]]")
    _, rows, trainer = run_fit(cfg)
    assert [r["seq_len"] for r in rows] == [8, 8, 16]
    assert [r["tokens"] for r in rows] == [4 * 16 * k for k in (1, 2, 3)]  # tokens kept

    ref = build_workload(cfg)
    model, opt = ref.model, optimizer_from(cfg, ref.model)
    sampler = ref.sampler(cfg.train.seed, shuffle=True)
    for step, length in enumerate((8, 8, 16)):
        x, y = ref.batch(sampler.indices(4 * step, 4))
        cuts = [(b, i) for b in range(4) for i in range(0, 16, length)]  # sequence by sequence
        xs = torch.stack([x[b, i : i + length] for b, i in cuts])
        ys = torch.stack([y[b, i : i + length] for b, i in cuts])
        loss = F.cross_entropy(model(xs).flatten(0, 1), ys.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    got, want = trainer.model.state_dict(), model.state_dict()
    for k in want:
        assert got[k].equal(want[k]), k


def test_seq_len_warmup_by_sequences_counts_the_tokens_it_trains(make_config) -> None:
    cfg = _lm(make_config, "schedule.seq_len=[[0, 8], [2, 16]]", "schedule.seq_len_batch=sequences")
    _, rows, _ = run_fit(cfg)
    assert [r["tokens"] for r in rows] == [4 * 8, 4 * 8 * 2, 4 * (8 + 8 + 16)]


def test_a_full_length_seq_len_schedule_is_no_schedule_bit_for_bit(make_config) -> None:
    weights = []
    for extra in ([], ["schedule.seq_len=[[0, 16]]"]):
        _, _, trainer = run_fit(_lm(make_config, *extra))
        weights.append(trainer.model.state_dict())
    for k in weights[0]:
        assert weights[0][k].equal(weights[1][k]), k


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["schedule.seq_len=[[0, 8], [0.5, 64]]"], "longer than the samples, model.seq_len=16"),
        (["schedule.seq_len_batch=halves", "schedule.seq_len=[[0, 8]]"], "seq_len_batch"),
    ],
)
def test_bad_seq_len_schedules_are_refused_before_training(make_config, overrides, message):
    with pytest.raises(ConfigError, match=r"^schedule\.seq_len") as err:
        make_config("lm", *overrides)
    assert message in str(err.value)


def test_seq_len_warmup_is_refused_off_a_language_model(make_config) -> None:
    with pytest.raises(ConfigError, match=r"^schedule\.seq_len: .*workload lm"):
        make_config("digits", "schedule.seq_len=[[0, 8]]")
