"""Tokenizers: raw UTF-8 bytes, or byte-level BPE trained with Hugging Face ``tokenizers``.

Both save to a folder holding ``tokenizer.json``, so a trained model ships with the
exact tokenizer it was trained with and ``load_tokenizer`` restores either kind.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from cadence.data.checks import check_tokenizer
from cadence.data.errors import DataError

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "PretrainedTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "load_tokenizer",
]

TOKENIZER_FILE = "tokenizer.json"
_CHUNK_CHARS = 1 << 16  # texts are encoded in ~64 KB pieces so encode_batch can parallelise


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer and the exporters need from a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: str | Path) -> Path: ...


def _as_int_list(ids: Iterable[int]) -> list[int]:
    if isinstance(ids, np.ndarray):
        return ids.astype(np.int64).ravel().tolist()
    if hasattr(ids, "tolist"):  # torch tensors
        return list(ids.tolist())  # type: ignore[union-attr]
    return [int(i) for i in ids]


class ByteTokenizer:
    """Every UTF-8 byte is a token (vocab 256): no training, no unknown tokens."""

    vocab_size: int = 256

    def encode(self, text: str) -> np.ndarray:
        """int64 ids; int64 so blocks can feed ``cross_entropy`` targets directly."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a single byte may be part of a character)."""
        return bytes([token_id])

    def decode(self, ids: Iterable[int]) -> str:
        """Invalid byte sequences (a sample cut mid-character) become U+FFFD, never errors."""
        data = np.asarray(_as_int_list(ids), dtype=np.int64)
        if data.size and (data.min() < 0 or data.max() > 255):
            raise ValueError("ByteTokenizer.decode: ids must be in [0, 255]")
        return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        path = out / TOKENIZER_FILE
        path.write_text(json.dumps({"type": "byte"}) + "\n", encoding="utf-8")
        return path


def _chunks(text: str, size: int = _CHUNK_CHARS) -> Iterator[str]:
    """Split just after a newline that sits between two non-space characters.

    Byte-level pre-tokenization (the GPT-2 regex) treats runs of whitespace
    specially, so a cut inside one could change the tokens. A lone newline between
    visible characters is its own pre-token either way, and BPE never merges across
    pre-tokens, so chunked encoding equals encoding the whole text.
    """
    n, start = len(text), 0
    while start < n:
        cut = start + size
        if cut >= n:
            yield text[start:]
            return
        j = text.find("\n", cut)
        while j != -1 and j + 1 < n and (text[j + 1].isspace() or text[j - 1].isspace()):
            j = text.find("\n", j + 1)
        if j == -1 or j + 1 >= n:
            yield text[start:]
            return
        yield text[start : j + 1]
        start = j + 1


class BPETokenizer:
    """Byte-level BPE (GPT-2 style): lossless on any text, ~3-4x fewer tokens than bytes."""

    def __init__(self, hf_tokenizer: object) -> None:
        self._tok = hf_tokenizer

    @property
    def vocab_size(self) -> int:
        """The trained vocabulary, which can be below the requested size on small texts."""
        return int(self._tok.get_vocab_size())  # type: ignore[attr-defined]

    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens: Sequence[str] = ()) -> BPETokenizer:
        """Train on ``text``; callers pass only the training split to avoid leakage.

        ``special_tokens`` (none by default, so existing vocabularies do not change) take the
        first ids, e.g. prepare-data's ``<|endoftext|>`` document separator.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
            special_tokens=list(special_tokens),
        )
        tok.train_from_iterator(_chunks(text), trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))

    def encode(self, text: str) -> np.ndarray:
        pieces = list(_chunks(text))
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        encs = self._tok.encode_batch(pieces, add_special_tokens=False)  # type: ignore[attr-defined]
        return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encs])

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(_as_int_list(ids), skip_special_tokens=False)  # type: ignore[attr-defined]

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        path = out / TOKENIZER_FILE
        self._tok.save(str(path))  # type: ignore[attr-defined]
        return path


# What a Hugging Face model directory keeps about its tokenizer besides tokenizer.json; copied
# with it so an exported model's AutoTokenizer loads the same special tokens.
PRETRAINED_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class PretrainedTokenizer(BPETokenizer):
    """A model directory's own fast tokenizer (``tokenizer.json``), with its special tokens.

    ``eos_token_id`` ends a generation; the directory's other tokenizer files travel with it
    into the run directory and any export, so ``AutoTokenizer`` can load it there too.
    """

    def __init__(self, hf_tokenizer: object, files: dict[str, bytes]) -> None:
        super().__init__(hf_tokenizer)
        self.files = files
        self.eos_token_id = self._special_id("eos_token")

    def special_token(self, key: str) -> str | None:
        """The text of a special token named in tokenizer_config.json (``eos_token``,
        ``bos_token``, ``pad_token``), if the folder names one."""
        raw = self.files.get("tokenizer_config.json")
        if raw is None:
            return None
        try:
            value = json.loads(raw).get(key)
        except (json.JSONDecodeError, AttributeError):
            return None
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None

    def _special_id(self, key: str) -> int | None:
        value = self.special_token(key)
        if value is None:
            return None
        token_id = self._tok.token_to_id(value)  # type: ignore[attr-defined]
        return int(token_id) if token_id is not None else None

    @classmethod
    def from_dir(cls, directory: str | Path) -> PretrainedTokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(directory)
        files = {n: (path / n).read_bytes() for n in PRETRAINED_FILES if (path / n).is_file()}
        return cls(HFTokenizer.from_file(str(path / TOKENIZER_FILE)), files)

    def save(self, directory: str | Path) -> Path:
        path = super().save(directory)
        for name, data in self.files.items():
            (path.parent / name).write_bytes(data)
        return path


def has_pretrained_tokenizer(directory: str | Path) -> bool:
    """A Hugging Face model directory that ships its tokenizer (``tokenizer.json``)."""
    return (Path(directory) / TOKENIZER_FILE).is_file()


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Restore what ``save`` wrote; accepts the folder or the ``tokenizer.json`` itself."""
    path = Path(directory)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(
            f"tokenizer: {path} does not exist; pass the folder a tokenizer was saved to"
        )
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"tokenizer: {path} is not a valid tokenizer.json") from None
    if isinstance(spec, dict) and spec.get("type") == "byte":
        return ByteTokenizer()
    if (path.parent / PRETRAINED_FILES[0]).is_file():
        return PretrainedTokenizer.from_dir(path.parent)
    return BPETokenizer.from_file(path)


def build_tokenizer(kind: str, text: str, vocab_size: int) -> Tokenizer:
    """Make the tokenizer named by ``data.tokenizer``; ``vocab_size`` only matters for BPE."""
    check_tokenizer(kind, vocab_size)
    if kind == "byte":
        return ByteTokenizer()
    if not text:
        raise DataError("data.path: cannot train a BPE tokenizer on empty text")
    return BPETokenizer.train(text, vocab_size)
