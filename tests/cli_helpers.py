"""Running the `cadence` CLI as a child process from tests: argument lists and environment.

Shared by tests/integration and tests/distributed (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import io
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path


def as_sets(overrides: Iterable[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]``."""
    out: list[str] = []
    for item in overrides:
        out += ["--set", item]
    return out


def cli_env() -> dict[str, str]:
    """This environment, unbuffered, and never a torchrun WORLD_SIZE the child would obey."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("WORLD_SIZE", None)
    return env


def cadence_cmd(*args: str) -> list[str]:
    """``python -m cadence ARGS`` with this interpreter."""
    return [sys.executable, "-m", "cadence", *args]


class Forked:
    """`target()` in a child process forked from this one: a `subprocess.Popen` look-alike
    (pid, poll, send_signal, kill, wait, communicate, returncode) whose child needs no fresh
    interpreter.

    A fresh `python -m cadence` (or benchmark script) pays several seconds of imports (torch,
    its compiler stack, transformers); a fork of the test process, which has them already,
    starts at once. The child is a real process all the same, so SIGKILL stops it at an
    arbitrary instruction, and it starts as a fresh interpreter would where that matters:
    default SIGINT/SIGTERM handling, its own process group, output to its own files (read back
    by `communicate`), `target`'s return value (or SystemExit code) as its exit status, and
    with `cwd`, that folder as working directory and first on sys.path, as `python -m` has it.
    """

    def __init__(
        self, target: Callable[[], int | None], cwd: str | os.PathLike[str] | None = None
    ) -> None:
        self.returncode: int | None = None
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 (closed by communicate)
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the test process
            code = 1
            try:
                os.setpgid(0, 0)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.dup2(self._out.fileno(), 1)
                os.dup2(self._err.fileno(), 2)
                sys.stdout, sys.stderr = (
                    io.TextIOWrapper(os.fdopen(fd, "wb", 0, closefd=False), write_through=True)
                    for fd in (1, 2)
                )
                os.environ.pop("WORLD_SIZE", None)
                if cwd is not None:
                    os.chdir(cwd)
                    sys.path.insert(0, os.getcwd())
                code = target() or 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                os._exit(code)
        self.pid = pid
        self.args: list[str] = []

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, flags)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N for signal N, as Popen
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(["cadence", *self.args], timeout or 0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end (killing the child if `timeout` passes), then its stdout and stderr."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        texts = []
        for f in (self._out, self._err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
            f.close()
        return texts[0], texts[1]


class ForkedCLI(Forked):
    """`cadence ARGS` (cadence.cli.main) in a forked child; see Forked. Tests of the entry point
    itself (argument parsing, one-line errors from a real interpreter) still start `python -m
    cadence` (`cadence_cmd`)."""

    def __init__(self, *args: str, cwd: str | os.PathLike[str] | None = None) -> None:
        from cadence.cli import main

        super().__init__(lambda: main(list(args)), cwd=cwd)
        self.args = list(args)


def run_script_forked(
    script: str | os.PathLike[str], *args: str, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python SCRIPT ARGS` to the end in a forked child (runpy, `__main__` as its name), with
    `env` added to its environment."""

    def target() -> None:
        os.environ.update(env or {})
        sys.argv = [str(script), *args]
        sys.path.insert(0, str(Path(script).parent))  # as `python SCRIPT` has it
        runpy.run_path(str(script), run_name="__main__")

    proc = Forked(target)
    proc.args = [str(script), *args]
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_forked(
    *args: str, timeout: float = 240, cwd: str | os.PathLike[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`cadence ARGS` to the end in a forked child (see ForkedCLI), as `subprocess.run` reports."""
    proc = ForkedCLI(*args, cwd=cwd)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(["cadence", *args], proc.returncode, out, err)
