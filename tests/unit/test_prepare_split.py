"""Any corpus splits: one file, 50 KB or 1 MB, is cut into pieces sized from its length, at line
boundaries, and split into training and validation the same way on every run and machine."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from cadence.cli import main
from cadence.data.cache import cached_corpus
from cadence.data.shards import INDEX_FILE, open_prepared, val_piece
from cadence.data.sources import open_sources, piece_bytes

NAMES = ["HAMLET", "OPHELIA", "HORATIO", "GERTRUDE", "POLONIUS", "LAERTES", "FIRST PLAYER"]
_WORDS = (
    "the and to of my that in you is not it with his this but for your me be he as what him so "
    "have will lord do no shall if are all our by thou o her more now good let on then how well "
    "sweet night love heaven father death mother king queen blood soul grave time word life "
    "speak dream heart honour madness tears ghost crown poison sword hand eyes fair noble ’tis "
    "naïve café — whither thee thy hath doth"
)
WORDS = _WORDS.split(" ")


def _play(n_bytes: int, seed: int, long_line: int = 0) -> str:
    """A play-like text of about ``n_bytes`` UTF-8 bytes: scenes, speakers, verse lines of a few
    words, blank lines between speeches; with ``long_line``, one line of that many bytes half
    way through (a paragraph without breaks, longer than a piece)."""
    rng = random.Random(seed)
    out: list[str] = []
    size, scene, placed = 0, 0, not long_line
    while size < n_bytes:
        if rng.random() < 0.03:
            scene += 1
            block = f"\nSCENE {scene}. A room in the castle.\n\n"
        else:
            lines = [f"{rng.choice(NAMES)}:\n"]
            for _ in range(rng.randint(1, 6)):
                words = [rng.choice(WORDS) for _ in range(rng.randint(4, 11))]
                lines.append(" ".join(words).capitalize() + rng.choice([",", ".", ";", "!", "?"]))
                lines[-1] += "\n"
            block = "".join(lines) + "\n"
        if not placed and size > n_bytes // 2:
            words, para = [], 0
            while para < long_line:
                words.append(rng.choice(WORDS))
                para += len(words[-1].encode()) + 1
            block = " ".join(words) + "\n\n"
            placed = True
        out.append(block)
        size += len(block.encode())
    return "".join(out)


def _split_pieces(out: Path) -> dict[str, list[bytes]]:
    """Each split's pieces as bytes: the byte tokenizer's ids are the text's bytes, and a
    separator (0, which text never holds) ends every piece."""
    corpus = open_prepared(out, verify=True)
    assert corpus.separator == 0
    pieces = {}
    for name in ("train", "val"):
        stream = getattr(corpus, name)
        raw = stream.read(0, stream.n_tokens).astype(np.uint8).tobytes()
        assert raw.endswith(b"\x00")
        pieces[name] = raw[:-1].split(b"\x00")
    return pieces


def _prepare(src: Path, out: Path, *flags: str) -> None:
    assert main(["prepare-data", str(src), "--out", str(out), *flags]) == 0


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file prepare-data wrote, the index without its creation time."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != INDEX_FILE}
    index = json.loads((out / INDEX_FILE).read_text())
    index.pop("created")
    files[INDEX_FILE] = json.dumps(index, sort_keys=True).encode()
    return files


def test_piece_size_rule() -> None:
    assert piece_bytes(0) == piece_bytes(5_000) == 1024  # small: a dozen lines at least
    assert piece_bytes(50_000) == 1250  # 40 pieces
    assert piece_bytes(1_000_000) == 16384  # 61 pieces, and more as text grows ...
    assert piece_bytes(64 << 20) == 16384  # ... to 4,096 of them
    assert piece_bytes(256 << 20) == 65536  # then pieces grow instead
    assert piece_bytes(4 << 30) == piece_bytes(100 << 30) == 1 << 20  # up to 1 MiB
    sizes = [piece_bytes(n) for n in range(0, 8 << 30, 1 << 26)]
    assert sizes == sorted(sizes)  # never smaller for more text


@pytest.mark.parametrize(
    ("n_bytes", "long_line"),
    [(1_000_000, 0), (50_000, 3_000)],
    ids=["1MB", "50KB"],
)
def test_one_file_splits_deterministically_disjointly_at_lines(
    tmp_path: Path, n_bytes: int, long_line: int, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _play(n_bytes, seed=n_bytes, long_line=long_line)
    data = text.encode()
    src = tmp_path / "play.txt"
    src.write_bytes(data)
    _prepare(src, tmp_path / "a")
    printed = capsys.readouterr().out
    _prepare(src, tmp_path / "b")
    assert _outputs(tmp_path / "a") == _outputs(tmp_path / "b")  # byte for byte, seed-free

    index = json.loads((tmp_path / "a" / INDEX_FILE).read_text())
    chunk = index["chunk_bytes"]
    assert chunk == piece_bytes(len(data)) and f"pieces of at most {chunk:,} bytes" in printed
    pieces = _split_pieces(tmp_path / "a")
    n_train, n_val = len(pieces["train"]), len(pieces["val"])
    n = n_train + n_val
    splits = index["splits"]
    assert splits["train"]["pieces"] == n_train and splits["val"]["pieces"] == n_val
    print(f"\n{len(data):,} bytes: {n} pieces of at most {chunk:,} bytes, {n_val} validation")
    assert n >= 40 and n_val >= 3

    # Disjoint and whole: the pieces, put back in corpus order by the rule, are the file.
    its = {s: iter(p) for s, p in pieces.items()}
    ordered = [next(its["val" if val_piece(i, 0.05) else "train"]) for i in range(n)]
    assert b"".join(ordered) == data
    train_text = b"\x00".join(pieces["train"])
    assert not any(p in train_text for p in pieces["val"])  # no validation text in training

    # Cut at line boundaries: every piece ends a line, except where one line is longer than a
    # piece (cut at the size, on a character boundary) and the file's own end.
    longest = max(data.split(b"\n"), key=len)
    a = data.index(longest)
    long_span = range(a + 1, a + len(longest)) if len(longest) > chunk else range(0)
    assert bool(long_span) == bool(long_line)
    offset = 0
    for p in ordered[:-1]:
        assert 0 < len(p) <= chunk
        p.decode("utf-8")  # whole characters
        offset += len(p)
        assert p.endswith(b"\n") or offset in long_span
    assert all(p.endswith(b"\n") for p in ordered[:-1]) != bool(long_line)


def test_the_data_cache_splits_a_file_as_prepare_data_does(tmp_path: Path) -> None:
    src = tmp_path / "play.txt"
    src.write_text(_play(200_000, seed=3), encoding="utf-8")
    _prepare(src, tmp_path / "cli")
    cached = cached_corpus(
        open_sources([src]),
        tokenizer="byte",
        vocab_size=256,
        val_fraction=0.05,
        max_bytes=None,
        window=129,
    )
    for split in ("train", "val"):
        ours = [p.read_bytes() for p in sorted((tmp_path / "cli").glob(f"{split}-*.bin"))]
        assert ours == [p.read_bytes() for p in sorted(cached.glob(f"{split}-*.bin"))]


def test_too_little_text_is_one_line_naming_the_file_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text(_play(600, seed=1), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["prepare-data", str(tiny), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cadence: error: ")
    assert str(tiny) in err[0] and "more text" in err[0] and "--chunk-bytes" in err[0]
    assert not out.exists()  # nothing half-written
    # The fix it names works: smaller pieces.
    _prepare(tiny, out, "--chunk-bytes", "100")
    # A 50 KB file in one 1 MiB piece (the old default) is refused the same way.
    src = tmp_path / "play.txt"
    src.write_text(_play(50_000, seed=2), encoding="utf-8")
    assert main(["prepare-data", str(src), "--out", str(tmp_path / "o2"), "--chunk-bytes",
                 str(1 << 20)]) == 2  # fmt: skip
    assert "too little text" in capsys.readouterr().err
    assert main(["prepare-data", str(src), "--out", str(tmp_path / "o3"), "--chunk-bytes",
                 "lots"]) == 2  # fmt: skip
    assert "--chunk-bytes: must be 'auto' or a whole number" in capsys.readouterr().err
