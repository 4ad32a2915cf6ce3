"""Unit tests for datasets, tokenizers, the sampler and the logistic-regression optimum."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cadence.data import (
    BPETokenizer,
    ByteTokenizer,
    DataError,
    EpochSampler,
    Tokenizer,
    build_tokenizer,
    load_breast_cancer_split,
    load_digits,
    load_mnist,
    load_tokenizer,
    logreg_grad,
    logreg_loss,
    logreg_optimum,
    split_indices,
)
from cadence.data.sources import Source, default_corpus, iter_pieces, open_sources

# ---------------------------------------------------------------- sampler


def test_sampler_epochs_are_permutations() -> None:
    s = EpochSampler(50, seed=3)
    for e in range(3):
        idx = s.indices(e * 50, 50)
        assert sorted(idx.tolist()) == list(range(50))
    assert not torch.equal(s.indices(0, 50), s.indices(50, 50))


def test_sampler_position_independent() -> None:
    s = EpochSampler(37, seed=1)
    whole = s.indices(5, 200)
    parts, pos = [], 5
    for count in (1, 30, 7, 0, 62, 100):
        parts.append(EpochSampler(37, seed=1).indices(pos, count))  # a fresh "resumed" sampler
        pos += count
    assert torch.equal(torch.cat(parts), whole)
    assert whole.dtype == torch.long


def test_sampler_seeds_and_order() -> None:
    a, b = EpochSampler(100, seed=0), EpochSampler(100, seed=1)
    assert not torch.equal(a.indices(0, 100), b.indices(0, 100))
    plain = EpochSampler(4, seed=9, shuffle=False)
    assert plain.indices(2, 7).tolist() == [2, 3, 0, 1, 2, 3, 0]
    assert plain.epoch_of(3) == 0 and plain.epoch_of(4) == 1 and plain.epoch_of(9) == 2


# ---------------------------------------------------------------- text


def _text(src: str | Path | Source, max_bytes: int | None = None) -> str:
    """A corpus as prepare-data reads it: its pieces, in order, joined."""
    return "".join(t for t, _, _ in iter_pieces(open_sources([src]), 1 << 20, None, max_bytes))


def test_default_corpus_is_sympys_py_files_in_order() -> None:
    src = default_corpus()
    assert src.files and all(f.suffix == ".py" for f in src.files)
    rel = [f.relative_to(src.path).as_posix() for f in src.files]
    assert rel == sorted(rel) and "__init__.py" in rel
    a, b = _text(src, 20_000), _text(default_corpus(), 20_000)
    assert a == b and 19_990 <= len(a.encode("utf-8")) <= 20_000
    assert _text(src, 40_000).startswith(a[:-4])
    assert a.startswith(src.files[0].read_text(encoding="utf-8")[:1000])


def test_folder_reads_text_in_order_and_skips_the_rest(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("alpha\n", encoding="utf-8")
    (tmp_path / "b" / "c.md").write_text("gamma é\n", encoding="utf-8")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("hidden", encoding="utf-8")
    text = _text(tmp_path)
    assert text == "alpha\ngamma é\n"
    assert _text(tmp_path / "a.txt") == "alpha\n"
    with pytest.raises(DataError, match="not a UTF-8 text file"):
        _text(tmp_path / "latin1.txt")
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    text = "héllo wörld — 日本 🙂\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.max() < 256
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids[:2].tolist() + [0xE6]).startswith("h")  # partial char: no error
    assert isinstance(tok, Tokenizer)
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer) and loaded.vocab_size == 256


def test_bpe_round_trip_and_save_load(tmp_path: Path) -> None:
    text = _text(default_corpus(), 200_000)
    tok = build_tokenizer("bpe", text, 400)
    assert isinstance(tok, BPETokenizer)
    assert 257 <= tok.vocab_size <= 400
    sample = text[:5000] + "\n  ünïcode ✓ 🙂\n\n"
    ids = tok.encode(sample)
    assert ids.max() < tok.vocab_size
    assert len(ids) < len(sample.encode("utf-8"))  # merges compress
    assert tok.decode(ids) == sample
    tok.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.vocab_size == tok.vocab_size
    assert np.array_equal(loaded.encode(sample), ids)


def test_bpe_chunked_encoding_matches_whole() -> None:
    text = _text(default_corpus(), 150_000)
    tok = build_tokenizer("bpe", text, 300)
    assert isinstance(tok, BPETokenizer)
    whole = tok._tok.encode(text).ids  # type: ignore[attr-defined]
    assert tok.encode(text).tolist() == whole


def test_tokenizer_config_errors() -> None:
    with pytest.raises(ValueError, match="data.tokenizer"):
        build_tokenizer("wordpiece", "abc", 1000)
    with pytest.raises(ValueError, match="data.vocab_size"):
        build_tokenizer("bpe", "abc", 256)
    assert build_tokenizer("byte", "", 0).vocab_size == 256


# ---------------------------------------------------------------- vision


def test_mnist() -> None:
    x, y = load_mnist()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [500] * 10
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    # real digits: some ink, mostly background
    assert 0.05 < x.mean().item() < 0.25


def test_digits() -> None:
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert x.min().item() >= 0.0 and x.max().item() == 1.0


def test_split_indices() -> None:
    tr, va = split_indices(1000, 0.2)
    tr2, va2 = split_indices(1000, 0.2)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(va) == 200 and len(tr) == 800
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(1000))
    torch.manual_seed(1234)  # the global RNG must not matter
    assert torch.equal(split_indices(1000, 0.2)[1], va)


# ---------------------------------------------------------------- tabular


def test_breast_cancer_split() -> None:
    xt, yt, xv, yv = load_breast_cancer_split(0.2)
    assert xt.dtype == torch.float64 and yt.dtype == torch.float64
    assert xt.shape[0] + xv.shape[0] == 569 and xt.shape[1] == 30
    assert set(yt.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(xt.mean(0), torch.zeros(30, dtype=torch.float64))
    torch.testing.assert_close(xt.std(0, unbiased=False), torch.ones(30, dtype=torch.float64))


def test_logreg_optimum() -> None:
    xt, yt, _, _ = load_breast_cancer_split()
    l2 = 1e-3
    theta, j_star = logreg_optimum(xt, yt, l2=l2)
    assert theta.shape == (31,)
    assert np.linalg.norm(logreg_grad(xt, yt, theta, l2)) < 1e-8
    assert logreg_loss(xt, yt, theta, l2) == pytest.approx(j_star, abs=1e-15)
    rng = np.random.default_rng(0)
    for scale in (1e-4, 1e-2, 1.0):
        for _ in range(5):
            assert j_star <= logreg_loss(xt, yt, theta + scale * rng.standard_normal(31), l2)


def test_logreg_loss_matches_torch() -> None:
    xt, yt, _, _ = load_breast_cancer_split()
    theta = np.random.default_rng(1).standard_normal(31) * 0.1
    w, b = torch.from_numpy(theta[:-1]), torch.tensor(theta[-1])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt)
    expected = bce.item() + 0.5 * 0.01 * float(w @ w)
    assert logreg_loss(xt, yt, theta, 0.01) == pytest.approx(expected, rel=1e-12)


def test_logreg_separable_unregularised() -> None:
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    y = np.array([0.0, 0.0, 1.0, 1.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theta, j_star = logreg_optimum(x, y)
    assert j_star == 0.0 and any("separable" in str(w.message) for w in caught)
    assert logreg_loss(x, y, 100 * theta) < 1e-10  # the direction drives J to 0
    # overlapping classes: a finite optimum exists even without l2
    xo = np.array([[-2.0], [-1.0], [0.5], [1.0], [2.0], [-0.5]])
    yo = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    theta_o, _ = logreg_optimum(xo, yo)
    assert np.linalg.norm(logreg_grad(xo, yo, theta_o)) < 1e-10
