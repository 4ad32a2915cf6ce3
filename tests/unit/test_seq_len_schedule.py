"""Sequence-length warmup: the length by step, and what a shortened batch holds.

References: the length is numpy's interp of the points, floored to a multiple of 8 and kept in
[8, model.seq_len]; a batch cut into pieces is the pieces a for-loop over each sequence makes,
and its mean token loss is the mean over those pieces run one by one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cadence.models.gpt import GPT, GPTConfig
from cadence.schedules.seq_len import seq_len_schedule, shorten


def test_the_length_is_the_points_floored_to_a_multiple_of_eight() -> None:
    s = seq_len_schedule([[0, 16], [0.5, 128]], full=128, keep="tokens", total_steps=40)
    t = np.arange(0, 45)
    raw = np.floor(np.interp(t, [0, 20], [16, 128])).astype(int)
    expected = np.clip(raw - raw % 8, 8, 128)
    assert [s.length_at(int(i)) for i in t] == expected.tolist()
    assert s.length_at(0) == 16 and s.length_at(20) == 128 and s.length_at(44) == 128


def test_a_length_below_eight_is_eight_and_a_short_context_is_its_own_floor() -> None:
    assert seq_len_schedule([[0, 3]], full=64, keep="tokens", total_steps=10).length_at(0) == 8
    assert seq_len_schedule([[0, 3]], full=5, keep="tokens", total_steps=10).length_at(0) == 5


def test_tokens_mode_cuts_every_sequence_into_pieces_as_a_loop_would() -> None:
    x = torch.arange(3 * 20).reshape(3, 20)
    y = x + 1000
    sx, sy = shorten((x, y), 8, "tokens")
    pieces = [row[i : i + 8] for row in x for i in range(0, 20 - 8 + 1, 8)]
    assert torch.equal(sx, torch.stack(pieces))
    assert torch.equal(sy, sx + 1000)
    assert sx.shape == (3 * (20 // 8), 8)


def test_sequences_mode_keeps_each_sequence_and_drops_its_tail() -> None:
    x = torch.arange(3 * 20).reshape(3, 20)
    sx, sy = shorten((x, x + 1), 8, "sequences")
    assert torch.equal(sx, x[:, :8]) and torch.equal(sy, x[:, 1:9])
    assert shorten((x, x), 20, "tokens")[0] is x  # the full length is left alone


@pytest.mark.parametrize("keep", ["tokens", "sequences"])
def test_tokens_per_sample_is_what_a_shortened_batch_holds(keep: str) -> None:
    s = seq_len_schedule([[0, 24], [10, 64]], full=64, keep=keep, total_steps=20)
    x = torch.zeros(4, 64, dtype=torch.long)
    for step in (0, 5, 10):
        sx, _ = s.shorten((x, x), step)
        assert sx.numel() == 4 * s.tokens_per_sample_at(step)


def test_the_mean_loss_of_a_cut_batch_is_the_mean_over_its_pieces_run_alone() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, seq_len=32, n_layer=1, n_head=2, d_model=16))
    seq = torch.randint(0, 50, (2, 33))
    x, y = seq[:, :-1], seq[:, 1:]
    sx, sy = shorten((x, y), 8, "tokens")
    batched = F.cross_entropy(model(sx).flatten(0, 1), sy.flatten())
    alone = [
        F.cross_entropy(model(x[b : b + 1, i : i + 8])[0], y[b, i : i + 8])
        for b in range(2)
        for i in range(0, 32, 8)
    ]
    torch.testing.assert_close(batched, torch.stack(alone).mean())


@pytest.mark.parametrize(
    ("points", "keep", "message"),
    [
        ([[0, 16], [10, 256]], "tokens", "longer than the samples, model.seq_len=128"),
        ([[0, 16]], "halves", "schedule.seq_len_batch: expected 'tokens'"),
        ([[0, 0]], "tokens", "schedule.seq_len: point 0: the value must be in [1"),
        ([[10, 16], [5, 32]], "tokens", "positions must not decrease"),
    ],
)
def test_bad_points_name_the_key(points: list, keep: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^schedule\.seq_len") as err:
        seq_len_schedule(points, full=128, keep=keep, total_steps=100)
    assert message in str(err.value)
