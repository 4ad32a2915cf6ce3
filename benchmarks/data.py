"""Prepared data: how fast `prepare-data` is, whether the loader can starve training, and
whether memory grows with the corpus.

Three measurements, each side by side in one run (the machines are shared and noisy):

1. **prepare throughput** in MB of text per second, for the byte tokenizer and for BPE at each
   worker count, on the same ~20 MB corpus;
2. **loader vs training**: tokens/s of drawing batches from the memory-mapped shards (the
   workload's `batch()` for the trainer's own sampler, random windows, batch 32 x 128) against
   tokens/s of the default recipe's training step on the same batches; the loader should be at
   least 20x faster, so it never limits training;
3. **peak RSS** of the same short training run (`cadence train`, 30 steps, random windows) from
   a ~20 MB and a ~1 GB prepared corpus, each in a fresh process. With memory-mapped shards the
   ratio should be close to 1: only the pages the batches touch become resident.

The large corpus is the sympy sources written again and again, each copy with its files in a
different seeded order, into --work (default: a temporary folder), never into the repository.

    python benchmarks/data.py                      # 20 MB and 1 GB corpora (several minutes)
    python benchmarks/data.py --big-mb 200         # a smaller "large" corpus
    python benchmarks/data.py --quick              # 5 MB vs 50 MB, one worker count
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from overhead import cpu_model


def corpus(dst: Path, megabytes: float, seed: int = 0) -> Path:
    """Folder of ~`megabytes` MB of real code: the sympy sources, copies in shuffled orders."""
    import sympy

    root = Path(sympy.__file__).parent
    files = sorted(p for p in root.rglob("*.py") if p.stat().st_size > 0)
    texts = [p.read_text(encoding="utf-8", errors="ignore") for p in files]
    dst.mkdir(parents=True, exist_ok=True)
    target, written, copy = megabytes * 1e6, 0, 0
    rng = random.Random(seed)
    while written < target:
        order = list(range(len(texts)))
        rng.shuffle(order)
        path = dst / f"copy{copy:04d}.txt"
        with path.open("w", encoding="utf-8") as fh:
            for i in order:
                if written >= target:
                    break
                fh.write(texts[i])
                fh.write("\n\n")
                written += len(texts[i].encode("utf-8")) + 2
        copy += 1
    return dst


def timed_prepare(src: Path, out: Path, **kwargs) -> float:
    """MB/s of text prepared (the index records the bytes read)."""
    from cadence.data.prepare import prepare_corpus

    t0 = time.perf_counter()
    index = prepare_corpus([src], out, progress=False, **kwargs)
    return index["bytes"] / 1e6 / (time.perf_counter() - t0)


def loader_vs_training(prepared: Path, steps: int) -> dict[str, float]:
    """Tokens/s of drawing batches vs of training on them (the default recipe's GPT)."""
    import cadence
    from cadence.workloads import build_workload

    cfg = cadence.load_config(
        None, [f"data.path={prepared}", "data.sampling=random", "train.progress=false"]
    )
    w = build_workload(cfg)
    sampler = w.sampler(cfg.train.seed)
    size, tokens = cfg.batch.size, cfg.batch.size * cfg.model.seq_len
    t0 = time.perf_counter()
    batches = [w.batch(sampler.indices(k * size, size)) for k in range(steps * 5)]
    load = steps * 5 * tokens / (time.perf_counter() - t0)
    opt = torch.optim.AdamW(w.model.parameters(), lr=1e-3)
    w.model.train()
    for x, y in batches[:3]:  # warm-up
        w.loss_sum(w.model, (x, y)).backward()
        opt.step()
        opt.zero_grad()
    t0 = time.perf_counter()
    for x, y in batches[3 : 3 + steps]:
        (w.loss_sum(w.model, (x, y)) / y.numel()).backward()
        opt.step()
        opt.zero_grad()
    train = steps * tokens / (time.perf_counter() - t0)
    return {"loader_tokens_per_s": load, "train_tokens_per_s": train, "ratio": load / train}


def peak_rss_mb(prepared: Path, run_dir: Path, steps: int) -> float:
    """Peak resident MB of `cadence train` on the corpus, in a fresh process."""
    code = (
        "import resource, sys\n"
        "from cadence.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "sys.exit(rc)\n"
    )
    args = ["train", "--set", f"data.path={prepared}", "--set", "data.sampling=random"]
    args += ["--set", f"train.max_steps={steps}", "--set", "train.eval_every=1000000"]
    args += ["--set", "train.progress=false", "--run-dir", str(run_dir)]
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    ).stdout
    kb = int(next(line.split()[1] for line in out.splitlines() if line.startswith("MAXRSS")))
    return kb / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small-mb", type=float, default=20)
    p.add_argument("--big-mb", type=float, default=1000)
    p.add_argument("--workers", default="1,2", help="BPE worker counts to time")
    p.add_argument("--steps", type=int, default=30, help="training steps of the RSS runs")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.small_mb, args.big_mb, args.workers, args.steps = 5, 50, "1", 10
    work = Path(args.work or tempfile.mkdtemp(prefix="cadence-data-bench-"))
    print(f"cadence data benchmark  {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC")
    print(f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; scratch {work}")
    print(f"load average before: {os.getloadavg()}")
    small = corpus(work / "small-src", args.small_mb)
    results: dict = {"prepare_mb_per_s": {}}
    rate = timed_prepare(small, work / "small-byte", tokenizer="byte")
    results["prepare_mb_per_s"]["byte"] = rate
    print(f"prepare {args.small_mb:.0f} MB, byte tokenizer: {rate:6.1f} MB/s")
    for n in [int(x) for x in args.workers.split(",")]:
        rate = timed_prepare(small, work / f"small-bpe-{n}", tokenizer="bpe", workers=n)
        results["prepare_mb_per_s"][f"bpe, {n} worker(s)"] = rate
        print(f"prepare {args.small_mb:.0f} MB, bpe 4096, {n} worker(s): {rate:6.1f} MB/s")
    lt = loader_vs_training(work / "small-byte", steps=20)
    results["loader"] = lt
    print(
        f"loader {lt['loader_tokens_per_s']:,.0f} tokens/s vs training "
        f"{lt['train_tokens_per_s']:,.0f} tokens/s: {lt['ratio']:.0f}x"
    )
    big = corpus(work / "big-src", args.big_mb, seed=1)
    rate = timed_prepare(big, work / "big-byte", tokenizer="byte")
    print(f"prepare {args.big_mb:.0f} MB, byte tokenizer: {rate:6.1f} MB/s")
    rss_small = peak_rss_mb(work / "small-byte", work / "run-small", args.steps)
    rss_big = peak_rss_mb(work / "big-byte", work / "run-big", args.steps)
    results["peak_rss_mb"] = {"small": rss_small, "big": rss_big, "ratio": rss_big / rss_small}
    print(
        f"peak RSS, {args.steps} training steps: {rss_small:,.0f} MB ({args.small_mb:.0f} MB "
        f"corpus) vs {rss_big:,.0f} MB ({args.big_mb:.0f} MB corpus): {rss_big / rss_small:.3f}x"
    )
    print(f"load average after: {os.getloadavg()}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
