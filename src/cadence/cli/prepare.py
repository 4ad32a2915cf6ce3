"""`cadence prepare-data`: argparse wiring and the handler.

The main CLI calls :func:`add_parsers` with its subparsers; the handler takes ``(args, console)``
and returns an exit status. Bad input raises ``DataError`` (one line, exit 2, printed by the main
CLI); the work itself is :func:`cadence.data.prepare.prepare_corpus`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["add_parsers", "cmd_prepare_data", "default_workers"]


def default_workers() -> int:
    """The CPUs this process may use (a container's share, not the host's), at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def add_parsers(sub: Any) -> None:
    """Register `prepare-data` on the main CLI's subparsers."""
    p = sub.add_parser(
        "prepare-data",
        help="tokenize a corpus once into token shards that training reads in place (data.path: DIR)",
        description="Tokenize SRC (text files, folders, .jsonl, .parquet, datasets saved with "
        "save_to_disk) into DIR: token shards, their index and the tokenizer, split into "
        "training and validation by piece: a document, or a part of one cut at line "
        "boundaries, sized from the corpus so even a single file splits. Re-running the same "
        "command after an interruption keeps the finished shards.",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="files or folders, in corpus order")
    p.add_argument(
        "--format",
        choices=("text", "chat", "instruction"),
        default="text",
        help="text (default): a corpus; chat or instruction: JSONL conversations "
        '({"messages": [...]} or {"prompt", "completion"}), rendered with the chat template '
        "(the --tokenizer folder's, or cadence's default) and written with the answer mask; "
        "train with data.format set to the same",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the prepared corpus's folder")
    p.add_argument(
        "--tokenizer",
        default="byte",
        metavar="byte|bpe|HF_DIR",
        help="byte (default), bpe (trained here on the training split), or a Hugging Face "
        "model folder with tokenizer.json (its eos token separates documents)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        metavar="N",
        help="BPE vocabulary to train (default 4096)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        default=0.05,
        help="share of pieces (documents, or chunks of long ones) held out (default 0.05)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="tokenizing processes for bpe and HF tokenizers (default: the CPUs available, at "
        f"most 8; here {default_workers()}); byte tokenizing runs in-process",
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        metavar="N",
        default=2**26,
        help="tokens per shard file (default 2**26)",
    )
    p.add_argument(
        "--chunk-bytes",
        metavar="N|auto",
        default="auto",
        help="the piece size: each piece goes whole to training or validation, and documents "
        "longer than N bytes are cut at line boundaries (default auto, from the sources' total "
        "size: total/40 within 1 KiB..16 KiB, so a single file of 40 KB gives 40 pieces; past "
        "64 MiB of text pieces grow, up to 1 MiB at 4 GiB)",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        metavar="N",
        default=None,
        help="prepare only the first N bytes of text, in corpus order (default: all)",
    )
    p.set_defaults(func=cmd_prepare_data)


def cmd_prepare_data(args: argparse.Namespace, console: Console) -> int:
    from cadence.data.prepare import prepare_corpus

    if args.format != "text":
        return _prepare_chat(args, console)
    start = time.perf_counter()
    index = prepare_corpus(
        args.sources,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        workers=args.workers if args.workers is not None else default_workers(),
        shard_tokens=args.shard_tokens,
        chunk_bytes=_chunk_bytes(args.chunk_bytes),
        max_bytes=args.max_bytes,
        progress=sys.stderr.isatty(),  # piped, a bar shows only its end: the summary below
    )
    seconds = time.perf_counter() - start

    console.print(_splits_table(args.out, index, ("documents", "pieces", "tokens")))
    tok = index["tokenizer"]
    skipped = index.get("skipped", {})
    notes = [f"skipped {skipped['files']:,} non-text files"] if skipped.get("files") else []
    if skipped.get("documents"):
        notes.append(f"skipped {skipped['documents']:,} records holding NUL or invalid text")
    console.print(
        f"tokenizer {tok['kind']} (vocab {tok['vocab_size']:,}, separator {index['separator']}, "
        f"{index['dtype']})" + "".join(f"  ·  {n}" for n in notes)
    )
    mb = index["bytes"] / 1e6
    chosen = "sized from the corpus" if _chunk_bytes(args.chunk_bytes) is None else "given"
    console.print(f"pieces of at most {index['chunk_bytes']:,} bytes ({chosen})")
    console.print(f"{mb:,.2f} MB of text in {seconds:.1f} s ({mb / max(seconds, 1e-9):,.2f} MB/s)")
    console.print(f"train on it with: --set data.path={args.out}")
    return 0


def _prepare_chat(args: argparse.Namespace, console: Console) -> int:
    from cadence.data.prepare_chat import prepare_chat

    start = time.perf_counter()
    index = prepare_chat(
        args.sources,
        args.out,
        fmt=args.format,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        progress=sys.stderr.isatty(),
    )
    seconds = time.perf_counter() - start
    console.print(_splits_table(args.out, index, ("examples", "tokens", "answer_tokens")))
    tok = index["tokenizer"]
    console.print(f"tokenizer {tok['kind']} (vocab {tok['vocab_size']:,}, {index['dtype']})")
    console.print(f"{index['bytes'] / 1e6:,.2f} MB of JSONL in {seconds:.1f} s")
    console.print(f"train on it with: --set data.format={args.format} --set data.path={args.out}")
    return 0


def _splits_table(out: str, index: dict[str, Any], counts: tuple[str, ...]) -> Table:
    """Per split: the index's ``counts`` (conversations are its "examples") and the shards."""
    table = Table(title=f"prepared {out}", title_justify="left")
    heads = [{"examples": "conversations"}.get(c, c.replace("_", " ")) for c in counts]
    for col in ("split", *heads, "shards"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, split in index["splits"].items():
        cells = [f"{split[c]:,}" for c in counts]
        table.add_row(name, *cells, str(len(split["shards"])))
    return table


def _chunk_bytes(value: str) -> int | None:
    """``auto`` (sized from the corpus: None) or a number of bytes; prepare checks the range."""
    if value.strip().lower() == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        from cadence.data.errors import DataError

        raise DataError(
            f"--chunk-bytes: must be 'auto' or a whole number of bytes, got {value!r}"
        ) from None
