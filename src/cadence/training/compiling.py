"""``train.compile``: whether ``torch.compile`` pays for a run, how it is applied, and the
fallback to eager when the compiler fails.

``auto`` (the default) compiles where it was measured to pay (benchmarks/compile.py and
overhead.py, figures in benchmarks/README.md): models made of Transformer blocks (cadence's GPT,
Hugging Face models), on runs long enough to earn the compile time back. The small MLPs, CNNs and
the linear model of the other workloads spend their steps in Python and tiny kernels that the
compiler cannot speed up. ``true`` compiles whatever the model, ``false`` never.

The model is compiled per block ("regional" compilation, as torchtitan does): the blocks are
identical, so they share one compiled graph and the compile time does not grow with depth, and
the module tree keeps its names (state-dict keys, FSDP2's per-block sharding, checkpoints are
untouched). A model without ``blocks`` is compiled whole.

The compiled code is cached on disk by inductor; it goes to the cadence cache
(``$CADENCE_CACHE/inductor``, unless ``TORCHINDUCTOR_CACHE_DIR`` is set) so a second run of the
same model starts without compiling again, and a temp-folder clean-up does not throw it away.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

__all__ = [
    "AUTO_MIN_STEPS",
    "Compiler",
    "compile_model",
    "is_compile_error",
    "uncompile",
    "wants_compile",
    "warn_fallback",
]

T = TypeVar("T")
BACKEND: str | Callable = "inductor"  # torch.compile's backend (tests swap in a failing one)

# benchmarks/compile.py, default GPT on two CPU cores (2026-12-02): per-block compile costs
# 8.3 s cold (3.4 s from inductor's cache) and saves ~10 % of a 300 ms step, so it pays back from
# ~280 steps cold, ~110 cached; whole-model compile cost 37.5 s for 3 %. The default recipe's 300
# steps measured 124.0 s compiled cold, 106.4 s cached, 113.1 s eager: too close to call, so
# auto waits for runs three times past the cold break-even. (Not measured on a GPU yet.)
AUTO_MIN_STEPS = 1000


def wants_compile(setting: bool | str, model: nn.Module, device: torch.device, steps: int) -> bool:
    """Whether this run compiles: the setting, or for ``auto`` the rule of the module docstring."""
    if setting != "auto":
        return bool(setting)
    if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
        return False
    if device.type == "cpu" and not _have_cxx():
        return False  # inductor's CPU backend builds C++; without a compiler it cannot run
    return steps >= AUTO_MIN_STEPS


def _have_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c)


def compile_model(model: nn.Module, step_model: nn.Module, regional: bool = True) -> nn.Module:
    """Compile ``model``'s blocks in place (or ``step_model`` whole when it has none, or when
    not ``regional``) and return the module the step should call."""
    from cadence.data.cache import cache_root

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    blocks = getattr(model, "blocks", None)
    if regional and isinstance(blocks, nn.ModuleList) and len(blocks):
        for block in blocks:
            block.compile(backend=BACKEND)
        return step_model
    return torch.compile(step_model, backend=BACKEND)


def uncompile(model: nn.Module) -> None:
    """Undo :func:`compile_model`'s per-block compilation (the blocks run eager again).

    ``nn.Module.compile`` keeps the compiled callable in ``_compiled_call_impl``; clearing it is
    the only way back that torch has (there is no public ``uncompile``)."""
    for block in getattr(model, "blocks", None) or []:
        block._compiled_call_impl = None


def is_compile_error(exc: BaseException) -> bool:
    """An error of the compiler stack (dynamo, AOT autograd, inductor, a C++ build), not of the
    model: those the run survives by going eager."""
    from torch._dynamo.exc import TorchDynamoException

    if isinstance(exc, TorchDynamoException):
        return True
    module = type(exc).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch"))


def warn_fallback(exc: BaseException) -> None:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    warnings.warn(
        f"train.compile: torch.compile failed ({type(exc).__name__}: {first[:200]}); "
        "training continues eager. Set train.compile=false to skip compiling.",
        RuntimeWarning,
        stacklevel=2,
    )


class Compiler:
    """The module a training step calls, compiled or not, and its way back to eager."""

    def __init__(
        self,
        setting: bool | str,
        model: nn.Module,
        step_model: nn.Module,
        device: torch.device,
        steps: int,
        sharded: bool,
    ) -> None:
        self.model, self.eager = model, step_model
        # auto stays eager under FSDP2: measured on one process and under DDP only, so far
        self.enabled = wants_compile(setting, model, device, steps) and not (
            setting == "auto" and sharded
        )
        self.module = compile_model(model, step_model, not sharded) if self.enabled else step_model

    def run(self, step: Callable[[nn.Module], T], before_retry: Callable[[], None]) -> T:
        """``step(module)``; a failure of the compiler turns compilation off (one warning) and
        the step runs again, eager, after ``before_retry`` (dropping half-made gradients)."""
        try:
            return step(self.module)
        except Exception as exc:
            if not self.enabled or not is_compile_error(exc):
                raise
            warn_fallback(exc)
            uncompile(self.model)
            self.module, self.enabled = self.eager, False
            before_retry()
            return step(self.module)

    def close(self) -> None:
        """Leave the model as the run found it: blocks compiled in place run eager again, so a
        model trained in Python (or the next run in the same process) is not silently compiled
        by an earlier run's setting."""
        if self.enabled:
            uncompile(self.model)
            self.module, self.enabled = self.eager, False
