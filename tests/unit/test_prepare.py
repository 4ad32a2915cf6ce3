"""`cadence prepare-data`: sources -> pieces -> token shards, read back with open_prepared."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cadence.cli import main
from cadence.data import BPETokenizer, DataError, load_tokenizer
from cadence.data import prepare as prep
from cadence.data import sources as srcmod
from cadence.data.prepare import PROGRESS_FILE, SEPARATOR_TOKEN, prepare_corpus
from cadence.data.shard_writer import ShardWriter
from cadence.data.shards import INDEX_FILE, dtype_for, open_prepared, val_piece

WORDS = ["alpha", "beta", "gamma", "épsilon", "ζeta", "日本語", "🙂", "def", "return", "{}", "("]


def _doc(rng: random.Random, lines: int) -> str:
    return "".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10))) + "\n" for _ in range(lines)
    )


def _corpus(root: Path, n: int = 30, seed: int = 0) -> list[str]:
    """A folder of small text files (each one piece at chunk_bytes >= 1024), plus files that
    must be skipped; returns the documents in the order prepare-data must read them."""
    rng = random.Random(seed)
    docs = {}
    for i in range(n):
        rel = f"d{i % 3}/f{i:02d}.txt"
        docs[rel] = f"doc {i}\n" + _doc(rng, rng.randint(1, 8))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(docs[rel], encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden\n")
    (root / "d0" / "blob.bin").write_bytes(b"\x00\x01binary")
    (root / "d1" / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    return [docs[k] for k in sorted(docs)]


def _pieces(out: Path) -> tuple[dict[str, list[str]], object]:
    """Each split's pieces, decoded: the streams cut at the separator after every piece."""
    corpus = open_prepared(out, verify=True)
    tok = load_tokenizer(out)
    result = {}
    for name in ("train", "val"):
        stream = getattr(corpus, name)
        ids = stream.read(0, stream.n_tokens)
        assert ids[-1] == corpus.separator  # every piece, the last too, ends with one
        parts = np.split(ids, np.flatnonzero(ids == corpus.separator) + 1)[:-1]
        result[name] = [tok.decode(p[:-1]) for p in parts]
    return result, corpus


def _in_order(pieces: dict[str, list[str]], vf: float) -> list[str]:
    """Interleave the splits back into corpus order by the validation rule."""
    n = len(pieces["train"]) + len(pieces["val"])
    assert sum(val_piece(i, vf) for i in range(n)) == len(pieces["val"])
    its = {s: iter(p) for s, p in pieces.items()}
    return [next(its["val" if val_piece(i, vf) else "train"]) for i in range(n)]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != INDEX_FILE}


def _index(out: Path) -> dict:
    index = json.loads((out / INDEX_FILE).read_text())
    index.pop("created")
    return index


# ---------------------------------------------------------------- round trip and the split


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_round_trip_val_rule_and_token_count(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    docs = _corpus(src)
    docs[3] += f"the text may spell {SEPARATOR_TOKEN} itself\n"  # stays text, not a separator
    rel = sorted(p.relative_to(src).as_posix() for p in src.rglob("f*.txt"))[3]
    (src / rel).write_text(docs[3], encoding="utf-8")
    vf = 0.25
    out = tmp_path / "out"
    index = prepare_corpus(
        [src], out, tokenizer=kind, vocab_size=300, val_fraction=vf, shard_tokens=97,
        chunk_bytes=4096, progress=False,
    )  # fmt: skip
    pieces, corpus = _pieces(out)
    # Round trip, and validation is exactly the pieces the rule names: nothing else leaks.
    assert _in_order(pieces, vf) == docs
    assert pieces["val"] == [d for i, d in enumerate(docs) if val_piece(i, vf)]
    assert pieces["train"] == [d for i, d in enumerate(docs) if not val_piece(i, vf)]
    assert not set(pieces["train"]) & set(pieces["val"])
    # Every token accounted for: the pieces' own tokens plus one separator each.
    tok = load_tokenizer(out)
    if isinstance(tok, BPETokenizer):
        tok._tok.encode_special_tokens = True  # type: ignore[attr-defined]  # as prepare-data does
    for split in ("train", "val"):
        own = sum(len(tok.encode(p)) for p in pieces[split])
        entry = index["splits"][split]
        assert entry["tokens"] == own + len(pieces[split]) == getattr(corpus, split).n_tokens
        assert entry["pieces"] == entry["documents"] == len(pieces[split])
        assert entry["bytes"] == sum(len(p.encode()) for p in pieces[split])
        assert all(s["tokens"] <= 97 for s in entry["shards"])
    assert index["bytes"] == sum(len(d.encode()) for d in docs)
    assert index["bytes"] == index["splits"]["train"]["bytes"] + index["splits"]["val"]["bytes"]
    assert index["skipped"] == {"files": 2, "documents": 0}  # blob.bin, latin1.txt
    assert index["tokenizer"]["kind"] == kind and index["tokenizer"]["source"] is None
    if kind == "bpe":
        assert isinstance(tok, BPETokenizer) and tok.vocab_size <= 300
        assert index["separator"] == tok._tok.token_to_id(SEPARATOR_TOKEN)  # type: ignore[attr-defined]
    else:
        assert index["separator"] == 0 and index["tokenizer"]["vocab_size"] == 256
    assert not (out / PROGRESS_FILE).exists()


def test_long_documents_are_cut_at_lines(tmp_path: Path) -> None:
    long_line = "ü" * 50 + "日本" * 20  # 160 bytes, longer than chunk_bytes: cut mid-line
    doc = "".join(f"line {i} {'x' * (i % 7)}\n" for i in range(40)) + long_line + "\nend\n"
    (tmp_path / "a.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "b.txt").write_text("short\n", encoding="utf-8")
    prepare_corpus(
        [tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", chunk_bytes=64,
        val_fraction=0.2, progress=False,
    )  # fmt: skip
    pieces = _in_order(_pieces(tmp_path / "out")[0], 0.2)
    assert "".join(pieces[:-1]) == doc and pieces[-1] == "short\n"
    assert len(pieces) > 10 and all(len(p.encode()) <= 64 for p in pieces)
    assert "\ufffd" not in "".join(pieces)  # no character was cut in two
    for p in pieces[:-1]:
        assert p.endswith("\n") or set(p) <= set(long_line)  # only the long line is cut inside


def test_large_files_are_memory_mapped_alike(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    _corpus(src, n=8)
    kw = dict(val_fraction=0.3, chunk_bytes=128, progress=False)
    whole = prepare_corpus([src], tmp_path / "whole", **kw)
    monkeypatch.setattr(srcmod, "WHOLE_FILE_BYTES", 4)  # every file takes the mmap path
    mapped = prepare_corpus([src], tmp_path / "mapped", **kw)
    assert whole["splits"] == mapped["splits"] and mapped["skipped"]["files"] == 2
    assert _files(tmp_path / "whole") == _files(tmp_path / "mapped")


def test_workers_give_identical_output(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    _corpus(src, n=40)
    kw = dict(tokenizer="bpe", vocab_size=320, val_fraction=0.2, shard_tokens=300)
    one = prepare_corpus([src], tmp_path / "one", workers=1, progress=False, **kw)
    submitted: list[int] = []

    class Spy(ProcessPoolExecutor):
        def submit(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            submitted.append(1)
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(prep, "ProcessPoolExecutor", Spy)
    monkeypatch.setattr(prep, "_TASK_BYTES", 300)  # many small tasks, so both workers get some
    prepare_corpus([src], tmp_path / "two", workers=2, progress=False, **kw)
    assert len(submitted) > 4
    assert len(one["splits"]["train"]["shards"]) > 2
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert _index(tmp_path / "one") == _index(tmp_path / "two")


def test_dtype_by_vocabulary(tmp_path: Path) -> None:
    assert dtype_for(256) == np.uint16 and dtype_for(2**16) == np.uint16
    assert dtype_for(2**16 + 1) == np.uint32 and dtype_for(200_000) == np.uint32
    src = tmp_path / "src"
    _corpus(src, n=10)
    index = prepare_corpus([src], tmp_path / "out", tokenizer="bpe", vocab_size=400, progress=False)
    assert index["dtype"] == "uint16"
    shard = index["splits"]["train"]["shards"][0]
    assert (tmp_path / "out" / shard["file"]).stat().st_size == 2 * shard["tokens"]


# ---------------------------------------------------------------- interruption and resume


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_kill_then_resume_keeps_finished_shards(tmp_path: Path, monkeypatch, kind: str) -> None:
    src = tmp_path / "src"
    _corpus(src, n=40)
    kw = dict(tokenizer=kind, vocab_size=300, val_fraction=0.2, shard_tokens=400)
    out = tmp_path / "out"
    prepare_corpus([src], out, progress=False, **kw)  # a finished corpus, then re-prepared
    real = ShardWriter._close
    closed: list[int] = []

    def dying(self: ShardWriter) -> None:
        real(self)
        closed.append(1)
        if len(closed) == 2:
            raise KeyboardInterrupt  # killed right after two shards were finished

    monkeypatch.setattr(ShardWriter, "_close", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([src], out, progress=False, **kw)
    monkeypatch.undo()
    assert not (out / INDEX_FILE).exists()  # the old index went first; no new one yet
    state = json.loads((out / PROGRESS_FILE).read_text())
    finished = [s["file"] for split in state["shards"].values() for s in split]
    assert len(finished) == 2
    before = {f: (out / f).stat() for f in finished}
    tok_before = (out / "tokenizer.json").stat()

    prepare_corpus([src], out, progress=False, **kw)
    for f, st in before.items():
        now = (out / f).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)  # not rewritten
    if kind == "bpe":  # not retrained
        assert (out / "tokenizer.json").stat().st_mtime_ns == tok_before.st_mtime_ns
    prepare_corpus([src], tmp_path / "clean", progress=False, **kw)
    assert _files(out) == _files(tmp_path / "clean")
    assert _index(out) == _index(tmp_path / "clean")


def test_other_settings_start_over(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    _corpus(src, n=30)
    out = tmp_path / "out"
    real = ShardWriter._close

    def dying(self: ShardWriter) -> None:
        real(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "_close", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([src], out, shard_tokens=300, progress=False)
    monkeypatch.undo()
    assert (out / "train-00000.bin").is_file()
    (out / "val-00042.bin").write_bytes(b"stale")  # as if left by an older preparation
    prepare_corpus([src], out, shard_tokens=300, val_fraction=0.3, progress=False)
    assert not (out / "val-00042.bin").exists()
    prepare_corpus([src], tmp_path / "clean", shard_tokens=300, val_fraction=0.3, progress=False)
    assert _files(out) == _files(tmp_path / "clean")
    # An output folder inside a source folder is never read as part of it.
    inside = prepare_corpus([src], src / "prepared", progress=False)
    again = prepare_corpus([src], src / "prepared", progress=False)
    assert inside["splits"] == again["splits"] and inside["sources"] == again["sources"]


# ---------------------------------------------------------------- other sources


def test_jsonl_documents(tmp_path: Path) -> None:
    docs = [f"record {i}: " + "é" * i for i in range(12)]
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    lines[3:3] = ["", json.dumps({"text": "has a \u0000 NUL"}), json.dumps({"text": ""})]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    index = prepare_corpus(
        [tmp_path / "data.jsonl"], tmp_path / "out", val_fraction=0.2, progress=False
    )
    assert _in_order(_pieces(tmp_path / "out")[0], 0.2) == docs
    assert index["skipped"]["documents"] == 1
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2 .*\"text\""):
        prepare_corpus([tmp_path / "bad.jsonl"], tmp_path / "out2", progress=False)


def test_parquet_documents(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = [f"row {i}\n" * (i + 1) for i in range(15)]
    pq.write_table(pa.table({"id": list(range(15)), "text": docs}), tmp_path / "d.parquet")
    prepare_corpus([tmp_path / "d.parquet"], tmp_path / "out", val_fraction=0.2, progress=False)
    assert _in_order(_pieces(tmp_path / "out")[0], 0.2) == docs
    pq.write_table(pa.table({"body": docs}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r'e\.parquet: has no "text" column \(columns: body\)'):
        prepare_corpus([tmp_path / "e.parquet"], tmp_path / "out2", progress=False)


def test_saved_hf_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    docs = [f"example {i} " + "ß" * i for i in range(20)]
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    index = prepare_corpus([tmp_path / "ds"], tmp_path / "out", val_fraction=0.2, progress=False)
    assert _in_order(_pieces(tmp_path / "out")[0], 0.2) == docs
    assert index["sources"][0]["files"] >= 2


def test_missing_optional_readers(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"d\.parquet: .*pip install pyarrow"):
        prepare_corpus([tmp_path / "d.parquet"], tmp_path / "o1", progress=False)
    with pytest.raises(DataError, match=r"ds: .*save_to_disk.*pip install datasets"):
        prepare_corpus([tmp_path / "ds"], tmp_path / "o2", progress=False)


def test_pretrained_tokenizer_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    docs = _corpus(src, n=12)
    model = tmp_path / "model"
    BPETokenizer.train("".join(docs), 300, special_tokens=["</s>"]).save(model)
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    index = prepare_corpus([src], tmp_path / "out", tokenizer=str(model), progress=False)
    assert index["tokenizer"]["kind"] == "hf" and index["tokenizer"]["source"] == str(model)
    assert _in_order(_pieces(tmp_path / "out")[0], 0.05) == docs
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(model / "tokenizer.json")).to_str()
    assert Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json")).to_str() == ours
    assert index["separator"] == Tokenizer.from_str(ours).token_to_id("</s>")

    (model / "tokenizer_config.json").write_text("{}")
    with pytest.raises(DataError, match="end-of-sequence"):
        prepare_corpus([src], tmp_path / "out", tokenizer=str(model), progress=False)
    assert (tmp_path / "out" / INDEX_FILE).is_file()  # refused before the old corpus was touched
    (model / "tokenizer.json").write_text('{"version": "nope"}')
    with pytest.raises(DataError, match="does not load"):
        prepare_corpus([src], tmp_path / "o3", tokenizer=str(model), progress=False)
    with pytest.raises(DataError, match="--tokenizer"):
        prepare_corpus([src], tmp_path / "o4", tokenizer="wordpiece", progress=False)


# ---------------------------------------------------------------- errors


def test_bad_input_errors(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"nowhere: does not exist"):
        prepare_corpus([tmp_path / "nowhere"], out, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".notes.txt").write_text("hidden")
    (empty / "x.bin").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match=r"empty: no text found"):
        prepare_corpus([empty], out, progress=False)
    one = tmp_path / "one.txt"
    one.write_text("a single short document\n")  # piece 0 is always validation
    with pytest.raises(DataError, match=r"one\.txt: too little text .* smaller --chunk-bytes"):
        prepare_corpus([one], out, progress=False)
    assert not out.exists()  # a refusal leaves nothing behind, not even the folder it made
    with pytest.raises(DataError, match=r"training split empty.*more text or another"):
        prepare_corpus([one], out, chunk_bytes=16, val_fraction=0.99, progress=False)
    with pytest.raises(DataError, match=r"not a UTF-8 text file"):
        prepare_corpus([empty / "x.bin"], out, progress=False)
    for vf in (0.0, 1.0, -0.5):
        with pytest.raises(DataError, match="--val-fraction"):
            prepare_corpus([one], out, val_fraction=vf, progress=False)
    with pytest.raises(DataError, match="--vocab-size"):
        prepare_corpus([one], out, tokenizer="bpe", vocab_size=100, progress=False)
    with pytest.raises(DataError, match="--workers"):
        prepare_corpus([one], out, workers=0, progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty and holds no prepared corpus"):
        prepare_corpus([empty.parent / "one.txt"], busy, progress=False)
    assert (busy / "mine.txt").read_text() == "keep me"


def test_unreadable_file_is_named(tmp_path: Path, monkeypatch) -> None:
    """As root (CI) chmod cannot make a file unreadable, so the refusal is simulated."""
    src = tmp_path / "src"
    _corpus(src, n=5)
    locked, real_open = src / "d1" / "f01.txt", Path.open

    def guarded(self: Path, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", guarded)
    with pytest.raises(DataError, match=r"f01\.txt: cannot read it \(Permission denied\)"):
        prepare_corpus([src], tmp_path / "out", progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _corpus(src, n=5)
    locked = src / "d1" / "f01.txt"
    locked.chmod(0)
    try:
        with pytest.raises(DataError, match=r"f01\.txt: cannot read it"):
            prepare_corpus([src], tmp_path / "out", progress=False)
    finally:
        locked.chmod(0o644)


def test_corrupt_truncated_and_unprepared(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _corpus(src, n=20)
    out = tmp_path / "out"
    index = prepare_corpus([src], out, shard_tokens=200, progress=False)
    shard = out / index["splits"]["train"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF
    shard.write_bytes(bytes(data))
    open_prepared(out)  # sizes still match: only the checksums see it
    with pytest.raises(DataError, match=rf"{shard.name} does not match its checksum"):
        open_prepared(out, verify=True)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match=rf"{shard.name} has {len(data) - 2} bytes"):
        open_prepared(out)
    with pytest.raises(DataError, match="prepare-data"):
        open_prepared(tmp_path / "src")


# ---------------------------------------------------------------- the CLI


def test_cli(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    _corpus(src, n=10)
    out = tmp_path / "out"
    assert main(["prepare-data", str(src), "--out", str(out), "--chunk-bytes", "256"]) == 0
    assert (out / INDEX_FILE).is_file()
    printed = capsys.readouterr().out
    assert "train" in printed and "val" in printed and "MB/s" in printed
    assert main(["prepare-data", str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cadence: error:") and "missing" in err[0]


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow installed")
def test_cli_parquet_without_pyarrow(tmp_path: Path, capsys) -> None:
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    assert main(["prepare-data", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "pip install pyarrow" in capsys.readouterr().err


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_max_bytes_keeps_a_deterministic_prefix_of_the_corpus(tmp_path, tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    text = "".join(f"def f{i}(x):\n    return x * {i}  # é\n" for i in range(4000))
    (src / "a.py").write_text(text)
    (src / "b.py").write_text(text[::-1])
    full = prepare_corpus([src], tmp_path / "full", tokenizer=tokenizer, vocab_size=300,
                          chunk_bytes=2048, progress=False)  # fmt: skip
    cut = prepare_corpus([src], tmp_path / "cut", tokenizer=tokenizer, vocab_size=300,
                         chunk_bytes=2048, max_bytes=50_001, progress=False)  # fmt: skip
    assert cut["max_bytes"] == 50_001 and cut["bytes"] <= 50_001 < full["bytes"]
    assert cut["bytes"] > 50_001 - 4  # cut at a character boundary, at most one char short
    # The same pieces as the full corpus up to the cut: its training stream is a prefix.
    a, b = open_prepared(tmp_path / "cut").train, open_prepared(tmp_path / "full").train
    if tokenizer == "byte":
        n = a.n_tokens - 1  # the last piece is cut (and its separator follows it)
        np.testing.assert_array_equal(a.read(0, n - 64), b.read(0, n - 64))
    with pytest.raises(DataError, match="--max-bytes"):
        prepare_corpus([src], tmp_path / "bad", max_bytes=0, progress=False)
