"""The data settings' rules, each written once: the loaders enforce them, and the config check
calls the same functions so a bad ``data.*`` value is refused before anything is read."""

from __future__ import annotations

from pathlib import Path

from cadence.data.errors import DataError


def check_val_fraction(val_fraction: float) -> float:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction: must be strictly between 0 and 1, got {val_fraction}")
    return val_fraction


def check_max_bytes(max_bytes: int | None) -> None:
    if max_bytes is not None and max_bytes < 1:
        raise DataError(f"data.max_bytes: must be a positive integer, got {max_bytes}")


def check_text_path(
    path: str, what: str = "a text file, a .jsonl file or a folder of text files"
) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path: {path} does not exist; point it at {what}")
    return p


def check_tokenizer(kind: str, vocab_size: int) -> None:
    """``vocab_size`` only matters for BPE (the byte tokenizer has 256 symbols)."""
    if kind not in ("byte", "bpe"):
        raise DataError(f"data.tokenizer: unknown tokenizer {kind!r}; use 'byte' or 'bpe'")
    if kind == "bpe" and (not isinstance(vocab_size, int) or vocab_size < 257):
        raise DataError(
            f"data.vocab_size: BPE needs a vocabulary of at least 257 (256 bytes plus "
            f"merges), got {vocab_size}; use e.g. 4096, or data.tokenizer: byte"
        )
