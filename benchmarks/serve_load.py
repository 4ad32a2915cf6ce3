"""Bounded load test of `cadence serve`: N concurrent clients for a fixed time, loopback only.

    python benchmarks/serve_load.py --run-dir runs/lm-...        # starts a server in-process
    python benchmarks/serve_load.py --url http://127.0.0.1:8000  # an already running server

Each client sends its next request as soon as the previous one returns (a closed loop), so the
offered load adapts to the server and the test cannot run away. Reports throughput (requests/s,
and tokens/s for language models), p50/p99 latency, the error count, and how many requests the
server's engine ran per forward pass (from /metrics). Only loopback addresses are accepted: this
is a local benchmark, not a tool for loading someone else's server.
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
from urllib.parse import urlparse

import httpx
import numpy as np

PROMPTS = ["def ", "import numpy as np\n", "class Matrix(", "    return ", "# compute the "]


def _check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"serve_load: {url}: only loopback servers (127.0.0.1, ::1, localhost) allowed")


def _start_server(run_dir: str, threads: int, api_key: str | None):
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


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _client(
    url: str,
    kind: str,
    args: argparse.Namespace,
    deadline: float,
    seed: int,
    out: list[tuple[float, bool, int]],
) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(timeout=args.timeout, headers=headers) as client:
        while time.perf_counter() < deadline:
            if kind == "lm":
                path = "/v1/generate"
                body = {
                    "prompt": rng.choice(PROMPTS),
                    "max_new_tokens": args.max_new_tokens,
                    "temperature": 0.8,
                    "seed": rng.randrange(1 << 30),
                }
            else:
                path = "/v1/predict"
                body = {"inputs": [[rng.random() for _ in range(args.features)]]}
            t0 = time.perf_counter()
            try:
                r = client.post(url + path, json=body)
                ok = r.status_code == 200
                tokens = r.json().get("completion_tokens", 0) if ok else 0
            except httpx.HTTPError:
                ok, tokens = False, 0
            out.append((time.perf_counter() - t0, ok, tokens))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    src.add_argument("--run-dir", help="start a server for this run in-process")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (max 256)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load (max 600)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="per generate request")
    p.add_argument("--features", type=int, default=None, help="predict: inputs per example")
    p.add_argument("--threads", type=int, default=1, help="torch threads of an in-process server")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--api-key", default=os.environ.get("CADENCE_API_KEY"))
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 256 or not 0 < args.duration <= 600:
        sys.exit("serve_load: --clients must be 1..256 and --duration 0..600 s")

    stop = None
    if args.run_dir:
        url, stop = _start_server(args.run_dir, args.threads, args.api_key)
    else:
        url = args.url.rstrip("/")
        _check_loopback(url)
    try:
        try:
            health = httpx.get(url + "/health", timeout=10).json()
        except httpx.HTTPError as exc:
            sys.exit(f"serve_load: {url}/health: {exc}; is the server running?")
        kind, workload = health["kind"], health["workload"]
        if args.features is None:
            args.features = {"mnist": 784, "digits": 64, "logreg": 30}.get(workload, 0)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        before = httpx.get(url + "/metrics", headers=headers, timeout=10).text

        results: list[tuple[float, bool, int]] = []
        start = time.perf_counter()
        deadline = start + args.duration
        threads = [
            threading.Thread(target=_client, args=(url, kind, args, deadline, i, results))
            for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        after = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    finally:
        if stop is not None:
            stop()

    lat = np.array([r[0] for r in results if r[1]]) * 1000
    errors = sum(1 for r in results if not r[1])
    tokens = sum(r[2] for r in results)
    batches = _metric(after, "cadence_batches_total") - _metric(before, "cadence_batches_total")
    jobs = _metric(after, "cadence_batched_jobs_total") - _metric(
        before, "cadence_batched_jobs_total"
    )
    print(
        f"serve_load: {workload} ({kind}) at {url}; {args.clients} clients for {elapsed:.1f} s; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"  requests    {len(results)} ({errors} errors)")
    print(f"  throughput  {len(lat) / elapsed:.1f} requests/s", end="")
    print(f", {tokens / elapsed:.1f} tokens/s" if kind == "lm" else "")
    if len(lat):
        print(
            f"  latency     p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms"
            f", max {lat.max():.1f} ms"
        )
    if batches:
        print(
            f"  batching    {jobs / batches:.2f} requests per forward batch ({int(batches)} batches)"
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
