"""Closed-loop load test of `cadence serve`: throughput and latency against concurrency.

    python benchmarks/serve_load.py --run-dir runs/lm-...        # starts a server in-process
    python benchmarks/serve_load.py --url http://127.0.0.1:8000  # an already running server
    python benchmarks/serve_load.py --url ... --types score --clients 1,4,16 --duration 5

What is measured. A language model gets two request types, side by side in one run, both on
POST /v1/completions:

  generate  a prompt from PROMPTS, --max-new-tokens sampled tokens (temperature 0.8, a random
            seed); its tokens are the generated ones (usage.completion_tokens).
  score     --score-len random token ids (below the vocabulary size from GET /tokenizer_info)
            with echo, logprobs 1, max_tokens 1, temperature 0: what lm-evaluation-harness sends
            for a log-likelihood; its tokens are the scored prompt tokens.

A classifier gets POST /v1/predict with one random example (type predict). Each type runs one
phase of --duration seconds per client count: first one client (the sequential baseline, one
request at a time), then each count of --clients. Each row of the table is one phase:
requests/s, tokens/s, p50/p90/p99 latency, errors, the mean engine jobs per forward batch (the
/metrics counters cadence_batched_jobs_total over cadence_batches_total, differenced over the
phase; a score request is two jobs, its one generated token and then the scoring pass, so its
value is per job, not per request) and the speedup of requests/s over the type's 1-client row:
how much the engine gains from batching concurrent requests over serving them one by one.

Why closed-loop. Each client sends its next request as soon as its previous one returns, so the
offered load follows the server's pace: the server never holds more than one request per client,
the test cannot run away, and every phase measures a fixed concurrency. The latency is that of a
client that waits its turn; an open stream of arrivals would also see the queueing of an
overloaded server, which this test by construction does not produce.

The numbers are only as good as the machine is quiet: the processor, CPU count and load average
before and after are printed so that a contended run can be recognised. An in-process server
(--run-dir) shares this process, and its GIL, with the client threads; --url against a separate
`cadence serve` measures the server alone, and then other traffic to it counts in /metrics.
Only loopback addresses are accepted: this is a local benchmark, not a tool for loading someone
else's server. Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import platform
import random
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np

PROMPTS = ["def ", "import numpy as np\n", "class Matrix(", "    return ", "# compute the "]
LM_TYPES = ("generate", "score")
TYPES = (*LM_TYPES, "predict")
MAX_CLIENTS = 256

Result = tuple[float, bool, int]  # latency in seconds, succeeded, tokens


@dataclass
class Phase:
    """One (type, clients) phase: every request's result and the engine's batch counters."""

    type: str
    clients: int
    elapsed: float
    results: list[Result]
    batches: float
    jobs: float

    @property
    def ok_latencies_ms(self) -> np.ndarray:
        return np.array([r[0] for r in self.results if r[1]]) * 1000

    @property
    def errors(self) -> int:
        return sum(1 for r in self.results if not r[1])

    @property
    def requests_per_s(self) -> float:
        return len(self.ok_latencies_ms) / self.elapsed

    @property
    def tokens_per_s(self) -> float:
        return sum(r[2] for r in self.results) / self.elapsed


def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"serve_load: {url}: only loopback servers (127.0.0.1, ::1, localhost) allowed")


def _start_server(
    run_dir: str, threads: int, api_key: str | None
) -> tuple[str, Callable[[], None]]:
    """Serve ``run_dir`` from a thread on a free 127.0.0.1 port; returns (url, stop)."""
    import torch
    import uvicorn

    from cadence.deploy.rundir import load_run
    from cadence.deploy.serve import ServeSettings, create_app

    torch.set_num_threads(threads)
    app = create_app(load_run(run_dir), ServeSettings(api_key=api_key))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            sys.exit("serve_load: the server did not start")
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def _client_counts(text: str) -> list[int]:
    """``--clients``: comma-separated counts, each 1..MAX_CLIENTS."""
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: comma-separated integers, e.g. 1,8,32"
        ) from None
    if not counts or any(not 1 <= c <= MAX_CLIENTS for c in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: each client count must be 1..{MAX_CLIENTS}")
    return counts


def _type_list(text: str) -> list[str]:
    """``--types``: comma-separated request types, in the order given."""
    types = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in types if t not in TYPES]
    if not types or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: request types are {', '.join(TYPES)}")
    return types


def _headers(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _counters(url: str, args: argparse.Namespace) -> tuple[float, float]:
    """The engine's (batches, batched jobs) counters from /metrics."""
    text = httpx.get(url + "/metrics", headers=_headers(args), timeout=10).text
    return _metric(text, "cadence_batches_total"), _metric(text, "cadence_batched_jobs_total")


def _request(rtype: str, args: argparse.Namespace, rng: random.Random) -> tuple[str, dict]:
    """The path and JSON body of one request of type ``rtype``."""
    if rtype == "generate":
        return "/v1/completions", {
            "prompt": rng.choice(PROMPTS),
            "max_tokens": args.max_new_tokens,
            "temperature": 0.8,
            "seed": rng.randrange(1 << 30),
        }
    if rtype == "score":
        ids = [rng.randrange(args.vocab_size) for _ in range(args.score_len)]
        return "/v1/completions", {
            "prompt": [ids],
            "echo": True,
            "logprobs": 1,
            "max_tokens": 1,
            "temperature": 0,
        }
    return "/v1/predict", {"inputs": [[rng.random() for _ in range(args.features)]]}


def _tokens(rtype: str, answer: dict[str, Any]) -> int:
    """The tokens a successful request counts: generated for generate, scored for score."""
    if rtype == "generate":
        return int(answer["usage"]["completion_tokens"])
    if rtype == "score":
        return int(answer["usage"]["prompt_tokens"])
    return 0


def _client(
    url: str,
    rtype: str,
    args: argparse.Namespace,
    deadline: float,
    rng: random.Random,
    out: list[Result],
) -> None:
    """Send requests one after another (each as soon as the last returned) until ``deadline``."""
    with httpx.Client(timeout=args.timeout, headers=_headers(args)) as client:
        while time.perf_counter() < deadline:
            path, body = _request(rtype, args, rng)
            t0 = time.perf_counter()
            try:
                r = client.post(url + path, json=body)
                ok = r.status_code == 200
                tokens = _tokens(rtype, r.json()) if ok else 0
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                ok, tokens = False, 0
            out.append((time.perf_counter() - t0, ok, tokens))


def _warm_up(url: str, rtype: str, args: argparse.Namespace) -> None:
    """One request of the type, not counted: pays first-call costs and stops a run whose
    requests the server rejects (a context too short for --score-len, say) before it starts."""
    path, body = _request(rtype, args, random.Random(0))
    try:
        r = httpx.post(url + path, json=body, headers=_headers(args), timeout=args.timeout)
    except httpx.HTTPError as exc:
        sys.exit(f"serve_load: warm-up {rtype} request: {exc}")
    if r.status_code != 200:
        sys.exit(f"serve_load: warm-up {rtype} request: HTTP {r.status_code}: {r.text[:500]}")


def _phase(url: str, rtype: str, clients: int, args: argparse.Namespace) -> Phase:
    batches0, jobs0 = _counters(url, args)
    results: list[Result] = []
    start = time.perf_counter()
    deadline = start + args.duration
    threads = [
        threading.Thread(
            target=_client,
            args=(url, rtype, args, deadline, random.Random(f"{rtype}/{clients}/{i}"), results),
        )
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    batches1, jobs1 = _counters(url, args)
    return Phase(rtype, clients, elapsed, results, batches1 - batches0, jobs1 - jobs0)


def _table(phases: list[Phase]) -> str:
    """One aligned row per phase; speedup is requests/s over the type's 1-client phase."""
    header = ["type", "clients", "requests", "req/s", "tokens/s", "p50 ms", "p90 ms", "p99 ms"]
    header += ["errors", "jobs/batch", "speedup"]
    base = {p.type: p.requests_per_s for p in phases if p.clients == 1}
    rows = []
    for p in phases:
        lat = p.ok_latencies_ms
        pct = [f"{np.percentile(lat, q):.1f}" if len(lat) else "-" for q in (50, 90, 99)]
        speedup = f"{p.requests_per_s / base[p.type]:.2f}x" if base.get(p.type) else "-"
        rows.append(
            [
                p.type,
                str(p.clients),
                str(len(p.results)),
                f"{p.requests_per_s:.1f}",
                f"{p.tokens_per_s:.1f}" if p.type in LM_TYPES else "-",
                *pct,
                str(p.errors),
                f"{p.jobs / p.batches:.2f}" if p.batches else "-",
                speedup,
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):  # not on every platform
        return "n/a"
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    src.add_argument("--run-dir", help="start a server for this run in-process")
    p.add_argument(
        "--clients",
        type=_client_counts,
        default=[1, 8, 32],
        help=f"concurrent client counts, comma-separated, each 1..{MAX_CLIENTS} (default 1,8,32;"
        " a 1-client baseline always runs)",
    )
    p.add_argument(
        "--types",
        type=_type_list,
        default=None,
        help="request types, comma-separated: generate,score for a language model (the"
        " default), predict for a classifier",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase (max 600)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="per generate request")
    p.add_argument("--score-len", type=int, default=128, help="prompt tokens per score request")
    p.add_argument("--features", type=int, default=None, help="predict: inputs per example")
    p.add_argument("--threads", type=int, default=1, help="torch threads of an in-process server")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--api-key", default=os.environ.get("CADENCE_API_KEY"))
    args = p.parse_args(argv)
    if not 0 < args.duration <= 600:
        sys.exit("serve_load: --duration must be 0..600 s")
    if args.max_new_tokens < 1 or args.score_len < 1:
        sys.exit("serve_load: --max-new-tokens and --score-len must be at least 1")
    counts = sorted({1, *args.clients})

    stop = None
    if args.run_dir:
        url, stop = _start_server(args.run_dir, args.threads, args.api_key)
    else:
        url = args.url.rstrip("/")
        _check_loopback(url)
    phases: list[Phase] = []
    try:
        try:
            health = httpx.get(url + "/health", timeout=10).json()
        except httpx.HTTPError as exc:
            sys.exit(f"serve_load: {url}/health: {exc}; is the server running?")
        kind, workload = health["kind"], health["workload"]
        if kind == "asr":
            sys.exit("serve_load: speech recognisers (/v1/transcribe) are not load-tested here")
        allowed = LM_TYPES if kind == "lm" else ("predict",)
        types = args.types or list(allowed)
        if any(t not in allowed for t in types):
            sys.exit(f"serve_load: this {kind} server takes the request types {', '.join(allowed)}")
        if kind == "lm" and "score" in types:
            info = httpx.get(url + "/tokenizer_info", headers=_headers(args), timeout=10)
            info.raise_for_status()
            args.vocab_size = int(info.json()["vocab_size"])
            context = int(info.json()["model_max_length"])
            if args.score_len + 1 > context:  # the prompt and its one generated token
                print(
                    f"serve_load: --score-len {args.score_len} lowered to {context - 1}: the"
                    f" model's context is {context} tokens"
                )
                args.score_len = context - 1
        if args.features is None:
            args.features = {"mnist": 784, "digits": 64, "logreg": 30}.get(workload, 0)

        server = f"in-process server, {args.threads} torch threads" if stop else "external server"
        print(
            f"serve_load: {workload} ({kind}) at {url} ({server}); types {', '.join(types)};"
            f" clients {','.join(map(str, counts))}; {args.duration:g} s per phase"
        )
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
        print(f"load average before: {_load_average()}")
        for rtype in types:
            _warm_up(url, rtype, args)
            for clients in counts:
                phases.append(_phase(url, rtype, clients, args))
    finally:
        if stop is not None:
            stop()

    print(f"load average after:  {_load_average()}")
    if "generate" in types:
        print(f"generate: {args.max_new_tokens} new tokens per request, tokens/s counts them")
    if "score" in types:
        print(f"score: {args.score_len} prompt tokens per request, tokens/s counts them")
    print(_table(phases))
    return 1 if any(p.errors for p in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
