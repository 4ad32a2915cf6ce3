"""Held to hand-tuned references on data cadence was not built on (issue 32, part 4).

For each case (a corpus, a model size, a token budget) three recipes train with the same
``train.max_tokens``, interleaved:

- **hand**: AdamW the way nanoGPT's character-level Shakespeare config sets it (lr 1e-3,
  betas (0.9, 0.99), weight decay 0.1, warmup over 2 % of the run (its 100 of 5,000 iterations)
  then cosine to lr/10, batch 64, gradient clipping 1.0), a published recipe for exactly this kind of small character-level GPT;
- **default**: cadence's default recipe (Muon, cosine, 10 % warmup, batch 32) as shipped;
- **auto**: the ``auto`` recipe (batch, LR and warmup decided by a pilot on the case's data).

The report gives each recipe's final validation loss, and the training time (the trainer's
``train_time_s``, evaluation excluded; auto's pilot included) at which default and auto first
reach the hand recipe's final loss, as a ratio of the hand recipe's whole time; and what auto
decided. Corpora, all offline: ``code`` (the installed sympy sources, cadence's default),
``prose`` (the descriptions in the installed packages' metadata), ``char`` (Python's own
reference documentation, ``pydoc_data/topics.py``: one ~1 MB file) and ``grammar`` (sentences
of a seeded probabilistic grammar, a process whose entropy is known). ``--hf`` adds a tiny
Llama built from a config and saved as a Hugging Face folder, trained on ``code``.

    python benchmarks/auto_vs_hand.py                       # the whole matrix (hours on a CPU)
    python benchmarks/auto_vs_hand.py --corpora code,char --sizes small --budgets 600000
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

import cadence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import cpu_model, loadavg  # noqa: E402

SIZES = {
    "tiny": ["model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.seq_len=64"],
    "small": ["model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.seq_len=128"],
}
HAND = [
    "optimizer.name=adamw",
    "optimizer.lr=1e-3",
    "optimizer.betas=[0.9, 0.99]",
    "optimizer.weight_decay=0.1",
    "schedule.name=cosine",
    "schedule.warmup=0.02",  # nanoGPT's 100 warmup iterations of 5,000
    "schedule.min_lr_ratio=0.1",
    "batch.size=64",
    "train.clip_grad_norm=1.0",
]
# Eager for all three: torch.compile's one-time build would land on whichever run came first.
COMMON = [
    "train.progress=false",
    "train.max_steps=1000000",
    "train.eval_samples=128",
    "train.compile=false",
]


def _prose(out: Path, limit: int) -> None:
    """The long descriptions in installed packages' metadata: English prose and markdown."""
    import importlib.metadata as md

    parts, size = [], 0
    for dist in sorted(md.distributions(), key=lambda d: d.metadata["Name"] or ""):
        text = dist.metadata.get_payload() or ""  # type: ignore[attr-defined]
        if len(text) > 2000:
            parts.append(text)
            size += len(text)
        if size >= limit:
            break
    out.write_text("\n\n".join(parts)[:limit])


def _char(out: Path) -> None:
    from pydoc_data import topics

    out.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)))


def _grammar(out: Path, limit: int, seed: int = 0) -> None:
    """Sentences of a small probabilistic grammar (a known process)."""
    rng = random.Random(seed)
    nouns = [
        "cat",
        "dog",
        "bird",
        "model",
        "river",
        "city",
        "teacher",
        "engine",
        "garden",
        "signal",
    ]
    verbs = ["sees", "follows", "trains", "builds", "finds", "moves", "watches", "lifts"]
    adjs = ["small", "quick", "bright", "old", "quiet", "large", "red", "clever"]
    preps = ["near", "under", "beside", "over", "behind"]

    def np_() -> str:
        words = ["the"] + ([rng.choice(adjs)] if rng.random() < 0.5 else []) + [rng.choice(nouns)]
        if rng.random() < 0.25:
            words += [rng.choice(preps), np_()]
        return " ".join(words)

    lines, size = [], 0
    while size < limit:
        s = f"{np_()} {rng.choice(verbs)} {np_()}."
        lines.append(s[0].upper() + s[1:])
        size += len(s) + 1
    out.write_text("\n".join(lines))


def corpus_sets(name: str, root: Path) -> list[str]:
    """The --set lines that point a run at corpus `name` (written under `root` once)."""
    if name == "code":
        return ["data.max_bytes=4000000"]
    path = root / f"{name}.txt"
    if not path.exists():
        {"prose": lambda: _prose(path, 4_000_000), "char": lambda: _char(path),
         "grammar": lambda: _grammar(path, 2_000_000)}[name]()  # fmt: skip
    return [f"data.path={path}", "data.tokenizer=byte"]


def run(recipe: str, sets: list[str], out: Path) -> dict[str, Any]:
    base = None if recipe == "hand" else ("auto" if recipe == "auto" else "default")
    overrides = [*(HAND if recipe == "hand" else []), *sets, *COMMON]
    summary = cadence.train(cadence.load_config(base, overrides), run_dir=out, plots=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["train_time_s"], r["val_loss"]) for r in rows if "val_loss" in r]
    pilot = summary.get("auto", {}).get("pilot", {}).get("seconds", 0.0)
    return {"final": evals[-1][1], "time": evals[-1][0] + pilot, "evals": evals,
            "pilot_s": pilot, "auto": summary.get("auto")}  # fmt: skip


def time_to(result: dict[str, Any], target: float) -> float | None:
    for seconds, loss in result["evals"]:
        if loss <= target:
            return seconds + result["pilot_s"]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpora", default="code,prose,char,grammar")
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--budgets", default="600000,2400000", help="token budgets, comma-separated")
    ap.add_argument("--eval-every", type=int, default=25, help="steps between evaluations")
    ap.add_argument("--hf", action="store_true", help="add a tiny Llama HF folder on code")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here")
    args = ap.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="auto-vs-hand-"))
    root.mkdir(parents=True, exist_ok=True)
    load = [loadavg()]
    cases = [
        (c, s, int(b), [*corpus_sets(c, root), *SIZES[s], f"train.max_tokens={b}"])
        for c in args.corpora.split(",")
        for s in args.sizes.split(",")
        for b in args.budgets.split(",")
    ]
    if args.hf:
        budget = int(args.budgets.split(",")[0])
        cases.append(("code", "hf-llama", budget, [*hf_sets(root), f"train.max_tokens={budget}"]))
    table, ratios = [], {"default": [], "auto": []}
    for corpus, size, budget, sets in cases:
        sets = [*sets, f"train.eval_every={args.eval_every}"]
        name = f"{corpus}-{size}-{budget}"
        results = {r: run(r, sets, root / name / r) for r in ("hand", "default", "auto")}
        target = results["hand"]["final"]
        row = [corpus, size, f"{budget:,}", f"{target:.3f} ({results['hand']['time']:.0f} s)"]
        for r in ("default", "auto"):
            t = time_to(results[r], target)
            ratio = None if t is None else t / results["hand"]["time"]
            ratios[r].append(float("inf") if ratio is None else ratio)
            row.append(
                f"{results[r]['final']:.3f} / " + ("never" if ratio is None else f"{ratio:.2f}x")
            )
        auto = results["auto"]["auto"] or {}
        row.append(", ".join(f"{k.split('.')[-1]} {v:.3g}" for k, v in auto.items() if k != "pilot")
                   + f", pilot {results['auto']['pilot_s']:.0f} s")  # fmt: skip
        table.append(row)
        print("| " + " | ".join(row) + " |", flush=True)
    load.append(loadavg())
    print(
        f"\n{datetime.date.today()} · {cpu_model()} · load {load[0]} -> {load[1]} · runs in {root}"
    )
    print(
        "| corpus | model | tokens | hand: final val loss (time) | default: final / time to "
        "hand's final | auto: final / time to hand's final | auto decided |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    for r in ("default", "auto"):
        print(f"median time to the hand recipe's final loss, {r}: {median(ratios[r]):.2f}x")
    return 0


def hf_sets(root: Path) -> list[str]:
    """A tiny Llama as a local Hugging Face folder (no tokenizer: the runs use cadence's
    byte-level one, whose 256 ids are its vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = root / "tiny-llama"
    if not folder.exists():
        config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                             max_position_embeddings=256)  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(str(folder))
    return ["data.max_bytes=4000000", f"model.hf={folder}", "model.seq_len=128"]


if __name__ == "__main__":
    raise SystemExit(main())
