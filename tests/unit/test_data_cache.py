"""The prepared-corpus cache: text and the bundled corpus are prepared once, then reused."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

import cadence
from cadence.data import DataError
from cadence.data import prepare as prepare_module
from cadence.data.cache import CACHE_ENV, cache_root, cached_corpus
from cadence.data.shards import is_prepared, open_prepared
from cadence.data.sources import open_sources, piece_bytes
from cadence.workloads import build_workload


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


def _corpus(folder: Path, n_files: int = 6, lines: int = 60) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = "".join(f"file {i} line {j}: the quick brown fox\n" for j in range(lines))
        (folder / f"doc{i:02d}.txt").write_text(body, encoding="utf-8")
    return folder


def _cached(src: Path, **kw) -> Path:
    opts = {"tokenizer": "byte", "vocab_size": 1024, "val_fraction": 0.1, "max_bytes": None}
    return cached_corpus(open_sources([src]), window=33, **(opts | kw))


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, "/somewhere/cache")
    assert cache_root() == Path("/somewhere/cache")
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert cache_root() == Path("/xdg/cadence")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "cadence"


def test_piece_size_rule() -> None:
    assert piece_bytes(4_000_000, 129) == 16384  # capped: a large corpus
    assert piece_bytes(40_000, 129) == 1000  # at least 40 pieces
    assert piece_bytes(2_000, 129) == 129  # but at least one window of text
    assert piece_bytes(100, 2) == 16  # and never below prepare's minimum


def test_prepared_once_then_reused(cache: Path, tmp_path: Path, monkeypatch) -> None:
    src = _corpus(tmp_path / "text")
    out = _cached(src)
    assert is_prepared(out) and out.parent == cache / "data"
    total = sum(f.stat().st_size for f in src.iterdir())
    corpus = open_prepared(out, verify=True)
    assert corpus.index["chunk_bytes"] == piece_bytes(total, 33)
    # tokens of both splits are the text's bytes plus one separator per piece
    counts = corpus.index["splits"]
    pieces = counts["train"]["pieces"] + counts["val"]["pieces"]
    assert corpus.train.n_tokens + corpus.val.n_tokens == total + pieces
    assert counts["val"]["pieces"] >= 1

    def refuse(*args, **kwargs):
        raise AssertionError("prepared again")

    monkeypatch.setattr(prepare_module, "prepare_corpus", refuse)
    assert _cached(src) == out  # the same sources and settings: read from the cache


def test_key_follows_sources_and_settings(cache: Path, tmp_path: Path) -> None:
    src = _corpus(tmp_path / "text")
    first = _cached(src)
    assert _cached(src, val_fraction=0.2) != first
    assert _cached(src, max_bytes=5000) != first
    assert _cached(src, tokenizer="bpe", vocab_size=300) != first
    doc = src / "doc00.txt"
    doc.write_text(doc.read_text() + "an edit\n", encoding="utf-8")
    os.utime(doc, ns=(doc.stat().st_atime_ns, doc.stat().st_mtime_ns + 10**9))
    edited = _cached(src)
    assert edited != first
    corpus = open_prepared(edited)
    tokens = [s.read(0, s.n_tokens) for s in (corpus.train, corpus.val)]
    assert "an edit" in bytes(np.concatenate(tokens).astype(np.uint8)).decode()


def _worker(src: str, cache: str, queue) -> None:
    os.environ[CACHE_ENV] = cache
    queue.put(str(_cached(Path(src))))


def test_concurrent_first_runs_prepare_once(tmp_path: Path, capfd) -> None:
    src = _corpus(tmp_path / "text", n_files=30, lines=400)
    cache = tmp_path / "shared-cache"
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(src), str(cache), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    paths = {queue.get(timeout=5) for _ in procs}
    assert len(paths) == 1 and is_prepared(paths.pop())
    assert capfd.readouterr().err.count("preparing") == 1


def test_bad_text_names_data_path(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\x00\x00\x01")
    with pytest.raises(DataError, match=r"^data\.path: .*no text found"):
        _cached(tmp_path / "bin")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r'^data\.path: .*bad\.jsonl:1 has no string "text"'):
        _cached(bad)
    assert not list((cache / "data").glob("*/index.json"))  # nothing that looks prepared


def test_lm_workload_trains_from_the_cache(cache: Path, tmp_path: Path) -> None:
    src = _corpus(tmp_path / "text", n_files=8, lines=200)
    cfg = cadence.load_config(
        None,
        [
            f"data.path={src}",
            "model.seq_len=32",
            "model.n_layer=1",
            "model.d_model=32",
            "model.n_head=2",
        ],
    )
    w = build_workload(cfg)
    corpus = w.corpus  # type: ignore[attr-defined]
    assert corpus.path.parent == cache / "data"
    assert w.n_train == corpus.train.n_tokens // 33 and w.val_size == corpus.val.n_tokens // 33
    x, y = w.batch(w.sampler(0).indices(0, 4))
    assert x.shape == (4, 32) and bool((x[:, 1:] == y[:, :-1]).all())
