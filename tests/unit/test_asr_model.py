"""The CTC recogniser (`cadence.models.asr`): alphabet, decoding, metrics, loss, model, export.

Expected values are derived in the test (one-hot log-probs, closed-form CTC sums, a second
edit-distance definition), not pasted from a run of the code under test.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from cadence.models.asr import (
    ALPHABET,
    BLANK,
    SpeechCTC,
    cer,
    ctc_loss,
    decode_ids,
    edit_distance,
    encode,
    greedy_decode,
)
from cadence.models.audio import SpeechCNN, normalise_utterance

SR = 16000
VOCAB = len(ALPHABET) + 1


@pytest.fixture
def one_thread_here() -> Iterator[None]:
    """One intra-op thread for the timing-sensitive test, whatever the session set; restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _one_hot_log_probs(paths: list[list[int]], vocab: int = VOCAB) -> torch.Tensor:
    """(B, T', vocab) log-probs whose per-frame argmax is `paths` (equal lengths)."""
    logits = F.one_hot(torch.tensor(paths), vocab).float() * 5.0
    return logits.log_softmax(dim=-1)


# --- alphabet ---------------------------------------------------------------------------------


def test_alphabet_is_the_ten_digits_after_the_blank() -> None:
    assert "".join(str(d) for d in range(10)) == ALPHABET
    assert BLANK == 0
    assert encode(ALPHABET) == list(range(1, 11))


def test_encode_decode_round_trip_and_blank_skipped() -> None:
    for text in ["417", "0", "9990", ""]:
        assert decode_ids(encode(text)) == text
    padded = torch.tensor(encode("52") + [BLANK, BLANK])
    assert decode_ids(padded) == "52"


@pytest.mark.parametrize("text, bad", [("4 1", " "), ("4a", "a"), ("٣", "٣")])
def test_encode_names_the_unknown_character(text: str, bad: str) -> None:
    with pytest.raises(ValueError, match=repr(bad)):
        encode(text)


@pytest.mark.parametrize("bad", [-1, VOCAB])
def test_decode_rejects_ids_outside_the_vocabulary(bad: int) -> None:
    with pytest.raises(ValueError, match=str(bad)):
        decode_ids([1, bad])


# --- greedy decoding --------------------------------------------------------------------------


def test_greedy_decode_collapses_repeats_then_drops_blanks() -> None:
    path = [1, 1, 0, 1, 2, 2, 0]
    # by the definition: collapse runs, then remove blanks
    want = [k for k, _ in itertools.groupby(path) if k != BLANK]
    assert want == [1, 1, 2]
    assert greedy_decode(_one_hot_log_probs([path])) == [want]


def test_greedy_decode_honours_lengths() -> None:
    paths = [[1, 1, 0, 1, 2, 2, 0], [3, 0, 3, 3, 4, 0, 5]]
    lp = _one_hot_log_probs(paths)
    for lengths in ([4, 7], [0, 5], [7, 1]):
        want = [
            [k for k, _ in itertools.groupby(p[:n]) if k != BLANK] for p, n in zip(paths, lengths)
        ]
        assert greedy_decode(lp, torch.tensor(lengths)) == want
    assert greedy_decode(lp, [4, 7]) == [[1, 1], [3, 3, 4, 5]]


# --- edit distance and CER --------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, want",
    [
        ("417", "417", 0),
        ("417", "412", 1),  # substitution
        ("417", "4127", 1),  # insertion
        ("417", "47", 1),  # deletion
        ("", "123", 3),
        ("123", "", 3),
        ("", "", 0),
        ("12345", "54321", 4),  # 1-5, 2-4 swapped; middle 3 kept
        ("1122", "2211", 4),
    ],
)
def test_edit_distance_hand_cases(a: str, b: str, want: int) -> None:
    assert edit_distance(a, b) == want
    assert edit_distance(list(a), list(b)) == want  # any sequence, not only str


def _levenshtein_recursive(a: str, b: str) -> int:
    """The textbook recursion, memoised: an independent definition to compare the DP against."""

    @cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def test_edit_distance_matches_the_recursive_definition() -> None:
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choices("012", k=rng.randint(0, 7)))
        b = "".join(rng.choices("012", k=rng.randint(0, 7)))
        want = _levenshtein_recursive(a, b)
        assert edit_distance(a, b) == want == edit_distance(b, a)
        assert abs(len(a) - len(b)) <= want <= max(len(a), len(b))


def test_cer_is_corpus_level() -> None:
    hyps, refs = ["417", "22", ""], ["412", "2290", "5"]
    edits = 1 + 2 + 1
    assert cer(hyps, refs) == pytest.approx(edits / (3 + 4 + 1))
    # not the mean of per-utterance rates, which would be (1/3 + 2/4 + 1) / 3
    assert cer(hyps, refs) != pytest.approx((1 / 3 + 2 / 4 + 1) / 3)
    assert cer(["4127"], ["4"]) == pytest.approx(3.0)  # insertions can exceed 1


def test_cer_with_no_reference_characters() -> None:
    assert cer([], []) == 0.0
    assert cer(["", ""], ["", ""]) == 0.0
    assert cer(["1", ""], ["", ""]) == 1.0
    with pytest.raises(ValueError):
        cer(["1"], ["1", "2"])


# --- CTC loss ---------------------------------------------------------------------------------


def test_ctc_loss_matches_torch_directly() -> None:
    gen = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 12, VOCAB, generator=gen).log_softmax(-1)
    targets = [[1, 2, 2], [5], [3, 4, 5, 6]]
    input_lengths = torch.tensor([12, 9, 11])
    padded = torch.zeros(3, 4, dtype=torch.int64)
    for i, t in enumerate(targets):
        padded[i, : len(t)] = torch.tensor(t)
    target_lengths = torch.tensor([len(t) for t in targets])
    want = F.ctc_loss(
        lp.transpose(0, 1), padded, input_lengths, target_lengths, blank=0, reduction="mean"
    )
    torch.testing.assert_close(ctc_loss(lp, targets, input_lengths), want)
    torch.testing.assert_close(ctc_loss(lp, padded, input_lengths), want)  # lengths inferred
    torch.testing.assert_close(ctc_loss(lp, padded, input_lengths, target_lengths), want)
    full = F.ctc_loss(
        lp.transpose(0, 1), padded, torch.full((3,), 12), target_lengths, reduction="mean"
    )
    torch.testing.assert_close(ctc_loss(lp, targets), full)  # input_lengths default: all frames


def test_ctc_loss_closed_forms() -> None:
    gen = torch.Generator().manual_seed(1)
    # One frame, one label: the only alignment is the label itself.
    lp = torch.randn(2, 1, VOCAB, generator=gen).log_softmax(-1)
    want = -(lp[0, 0, 3] + lp[1, 0, 7]) / 2  # mean over the batch; target length 1
    torch.testing.assert_close(ctc_loss(lp, [[3], [7]]), want)
    # Two frames, one label a: alignments (a, a), (blank, a), (a, blank).
    lp = torch.randn(1, 2, VOCAB, generator=gen).log_softmax(-1)
    p = lp[0].exp()
    a = 4
    prob = p[0, a] * p[1, a] + p[0, BLANK] * p[1, a] + p[0, a] * p[1, BLANK]
    torch.testing.assert_close(ctc_loss(lp, [[a]]), -torch.log(prob))
    # Two frames, target (a, b): the only alignment is a then b; divided by target length 2.
    b = 9
    torch.testing.assert_close(ctc_loss(lp, [[a, b]]), -(lp[0, 0, a] + lp[0, 1, b]) / 2)


def test_ctc_loss_zeroes_an_unalignable_utterance() -> None:
    """A repeated pair needs a blank between, so (1, 1) cannot fit two frames: inf, zeroed."""
    lp = torch.randn(2, 2, VOCAB).log_softmax(-1).requires_grad_()
    loss = ctc_loss(lp, [[1, 1], [2]])
    alignable = -torch.logsumexp(
        torch.stack(
            [lp[1, 0, 2] + lp[1, 1, 2], lp[1, 0, 0] + lp[1, 1, 2], lp[1, 0, 2] + lp[1, 1, 0]]
        ),
        dim=0,
    )
    torch.testing.assert_close(loss, (0.0 + alignable) / 2)
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    assert torch.count_nonzero(lp.grad[0]) == 0


# --- the model --------------------------------------------------------------------------------


def test_normalise_matches_speechcnn() -> None:
    mel = torch.randn(3, 40, 77, generator=torch.Generator().manual_seed(2)) * 4.0 - 9.0
    torch.testing.assert_close(normalise_utterance(mel), SpeechCNN(n_classes=2).normalise(mel))


def test_default_size_and_output_parameters() -> None:
    model = SpeechCTC()
    assert 200_000 <= model.num_params() <= 500_000
    names = dict(model.named_parameters())
    assert model.output_parameter_names() <= names.keys()
    head = sum(names[n].numel() for n in model.output_parameter_names())
    assert head == (144 + 1) * VOCAB


@pytest.mark.parametrize("samples", [8000, 16000, 16001, 23999, 48000, 1000, 321])
def test_output_lengths_match_forward(samples: int) -> None:
    model = SpeechCTC(dim=16, layers=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, samples))
    assert out.shape == (2, int(model.output_lengths(torch.tensor([samples]))[0]), VOCAB)
    # (1 + T // 160) log-mel frames, halved by the stride-2 conv (rounding up: padding 1)
    assert out.shape[1] == math.ceil((1 + samples // 160) / 2)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, out.shape[1]))


def test_output_lengths_is_vectorised() -> None:
    model = SpeechCTC(dim=16, layers=1)
    samples = torch.tensor([8000, 16001, 48000])
    want = torch.tensor([math.ceil((1 + int(s) // 160) / 2) for s in samples])
    assert torch.equal(model.output_lengths(samples), want)


def test_augment_only_in_training() -> None:
    model = SpeechCTC(dim=16, layers=1, dropout=0.0)
    x = torch.randn(2, SR, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        clean = model(x)
        torch.manual_seed(0)
        assert not torch.allclose(model.train()(x), clean)
        plain = SpeechCTC(dim=16, layers=1, dropout=0.0, augment=False)
        plain.load_state_dict(model.state_dict())
        assert torch.equal(plain.train()(x), clean)  # LayerNorm: no train/eval difference


def _tone_clips(texts: list[str], samples: int) -> torch.Tensor:
    """Each digit a 0.15 s tone at its own frequency, 0.05 s of silence around each, faint noise."""
    gen = torch.Generator().manual_seed(4)
    t = torch.arange(int(0.15 * SR)) / SR
    envelope = torch.hann_window(t.numel(), periodic=False)
    gap = torch.zeros(int(0.05 * SR))
    clips = torch.zeros(len(texts), samples)
    for i, text in enumerate(texts):
        parts = [gap]
        for ch in text:
            parts += [0.5 * envelope * torch.sin(2 * math.pi * (400 + 150 * int(ch)) * t), gap]
        x = torch.cat(parts)
        clips[i, : x.numel()] = x
    return clips + 1e-3 * torch.randn(clips.shape, generator=gen)


@pytest.mark.usefixtures("one_thread_here")
def test_overfits_tone_sequences_to_zero_cer() -> None:
    texts = ["417", "2290", "53", "8816"]  # repeats: the blank must learn to separate them
    x = _tone_clips(texts, SR)
    targets = [encode(t) for t in texts]
    torch.manual_seed(0)
    model = SpeechCTC(dim=48, layers=2, dropout=0.0, augment=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = ctc_loss(model(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        lp = model(x)
    lengths = model.output_lengths(torch.full((len(texts),), SR))
    hyps = [decode_ids(ids) for ids in greedy_decode(lp, lengths)]
    assert hyps == texts, f"loss {loss.item():.3f}"
    assert cer(hyps, texts) == 0.0
