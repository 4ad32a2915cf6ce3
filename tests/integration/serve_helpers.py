"""Shared pieces of the serving tests: a real uvicorn server in a thread, and a scripted GPT.

:class:`Server` binds 127.0.0.1:0, waits for uvicorn to start and is stopped by its fixture, so
nothing outlives the tests and nothing listens beyond loopback.

:func:`cycle_lm_run` writes a run directory whose GPT (byte tokenizer) greedily continues a
fixed cycle of bytes, whatever the context: every block's weights are zero (each block is then
the identity on its residual stream), token ``CYCLE[i]`` embeds as the unit vector ``e_i`` and
the head maps ``e_i`` to ``CYCLE[i + 1]``. A trained tiny model's greedy output is all spaces;
this one gives varied text, a two-byte UTF-8 character included, to cut with stop strings.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import uvicorn
from safetensors.torch import save_model

import cadence
from cadence.config import dump_config
from cadence.data.tokenizers import ByteTokenizer
from cadence.deploy.rundir import LoadedRun, load_run
from cadence.deploy.serve import ServeSettings, create_app
from cadence.workloads import build_model

LIMIT = 64  # the servers' max_new_tokens limit in the tests
KEY = "s3cret-token"  # the bearer token of the servers that require one

# What cycle_lm_run's model writes, over and over; after "def " it starts at "é".
CYCLE = "def é(x)+ghijklmnopq"


class Server:
    """uvicorn serving an app in a thread on an already-bound loopback socket."""

    def __init__(self, run: LoadedRun, settings: ServeSettings) -> None:
        self.run = run
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(run, settings), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.sock = sock

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve(run: Path | LoadedRun, limit: int, **settings: object) -> Iterator[Server]:
    """A fixture body: a server for ``run`` (a directory or a loaded run), stopped afterwards."""
    torch.set_num_threads(1)
    loaded = run if isinstance(run, LoadedRun) else load_run(run)
    server = Server(loaded, ServeSettings(max_new_tokens_limit=limit, **settings))  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
    assert not server.thread.is_alive()


def cycle_lm_run(run_dir: Path) -> Path:
    """A run directory (config.yaml, tokenizer.json, weights) of the scripted cycle GPT."""
    cfg = cadence.load_config(
        None,
        [
            "workload=lm",
            "model.n_layer=1",
            "model.d_model=32",
            "model.n_head=2",
            "model.seq_len=32",
            "model.tie_embeddings=false",
        ],
    )
    cycle = list(CYCLE.encode())
    assert len(set(cycle)) == len(cycle) <= cfg.model.d_model
    model = build_model(cfg, vocab_size=ByteTokenizer.vocab_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("blocks."):
                p.zero_()
        model.tok_emb.weight.zero_()
        model.head.weight.zero_()
        for i, tok in enumerate(cycle):
            model.tok_emb.weight[tok, i] = 1.0
            model.head.weight[cycle[(i + 1) % len(cycle)], i] = 10.0
    run_dir.mkdir(parents=True)
    save_model(model, str(run_dir / "model.safetensors"))
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    ByteTokenizer().save(run_dir)
    return run_dir


def read_events(response: Any) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """/v1/generate's server-sent events: the token pieces, and the final ``done`` summary."""
    pieces, done, event = [], None, "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            if event == "done":
                done = data
            else:
                pieces.append(data)
    return pieces, done
