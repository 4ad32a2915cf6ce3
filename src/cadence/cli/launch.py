"""`cadence train --nproc N`: torchrun's own launcher, run inside this process.

The launch is torch's elastic agent with exactly the configuration that `torchrun --standalone
--nproc-per-node N` builds (`torch.distributed.run.config_from_args`): the same c10d rendezvous,
environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), monitoring and failure handling. The one
difference is how a rank starts. torchrun execs a fresh `python -m cadence` per rank, and each
pays the imports again (torch, its compiler stack: ~7 s of CPU per rank on a small machine). Here
this process has already imported cadence, so on a machine without CUDA each rank is forked from
it and starts training at once; where CUDA is available the ranks are spawned (a CUDA runtime does
not survive fork), which costs what torchrun costs.
"""

from __future__ import annotations

import logging
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cadence.config import ConfigError

# The signals torch's agent takes over in the launching process (torch.distributed.elastic's
# multiprocessing installs handlers for them); restored afterwards, so that calling `launch` from
# Python (a notebook, a test) leaves the caller's handlers as they were.
_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
    if hasattr(signal, name)
)


# torch's process monitor logs a failed rank's exit with a traceback of its own polling code;
# the rank's own output (its traceback or `cadence: error:` line) and the one line `launch`
# prints say what happened, so that logger is kept to critical messages during a launch.
_MONITOR_LOGGER = "torch.distributed.elastic.multiprocessing.api"


@contextmanager
def _launching() -> Iterator[None]:
    before = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    monitor = logging.getLogger(_MONITOR_LOGGER)
    level = monitor.level
    monitor.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        monitor.setLevel(level)
        for sig, handler in before.items():
            if handler is not None:
                signal.signal(sig, handler)


def start_method() -> str:
    """fork where no CUDA device is visible (nothing to lose, the imports to gain), else spawn."""
    import torch

    return "spawn" if torch.cuda.is_available() else "fork"


def launch(
    nproc: int, argv: list[str], entry: Callable[[list[str]], None], max_restarts: int = 0
) -> int:
    """Run `entry(argv)` on `nproc` local ranks; the exit status of the whole launch.

    `entry` must be a module-level function (spawn pickles it). A failed rank fails the launch:
    torch's agent stops the other ranks and, while `max_restarts` allows, starts them all again
    (TORCHELASTIC_RESTART_COUNT counts the restarts; `cadence train` resumes from the newest
    checkpoint then). Past that, the first failure's exit code is returned with one line naming
    the rank (the rank's own output, traceback or `cadence: error:` line, came first).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    if nproc < 1:
        raise ConfigError(f"--nproc: must be >= 1, got {nproc}")
    if max_restarts < 0:
        raise ConfigError(f"--max-restarts: must be >= 0, got {max_restarts}")
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
        + ["-m", "cadence", *argv]
    )
    # what `torchrun --standalone` sets (torch.distributed.run.run): a private c10d store on a
    # free port of this host, under a fresh run id
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    config, _, _ = config_from_args(args)
    config.start_method = start_method()
    with _launching():
        try:
            elastic_launch(config, entry)(argv)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
            how = (
                f"was killed by signal {-failure.exitcode}"
                if failure.exitcode < 0
                else f"exited with status {failure.exitcode}"
            )
            print(f"cadence: error: rank {rank} {how}; the launch stopped", file=sys.stderr)
            return code
        except SignalException as exc:
            print(f"cadence: interrupted ({exc.sigval.name})", file=sys.stderr)
            return 128 + int(exc.sigval)
    return 0
