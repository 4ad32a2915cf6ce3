"""Registry entries for optimizers from maintained packages: learning-rate-free and second-order.

Taken from packages rather than written here, as the issue asks: Prodigy from ``prodigyopt``
(its authors' package), D-Adaptation Adam, SOAP, PSGD-Kron, AdEMAMix and MARS from
``pytorch-optimizer``, which tracks the papers and tests each against its reference. Each gets
cadence's parameter groups (no weight decay on norms, biases and embeddings), so LR schedules,
``schedule.momentum`` and ``schedule.weight_decay`` reach it like any torch optimizer.

None of them runs on FSDP2-sharded parameters: the preconditioners (SOAP, PSGD-Kron) need whole
matrices, and the step-size estimates (Prodigy, D-Adaptation) and MARS's gradient correction sum
over whole tensors; on a shard they would silently compute something else, so the config check
refuses them there (``shardable=False``). Under DDP every process holds whole tensors and they
run as on one process.
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Callable
from typing import Any

from torch import nn

from cadence.optim.base import OptimizerSpec, trainable_groups

__all__ = ["PACKAGE_OPTIMIZERS"]

DEFAULT_KRON_MOMENTUM = 0.9  # the package's default; 0 would switch off its momentum


def _from_package(name: str) -> Callable[..., Any]:
    """``pytorch_optimizer.<name>``, imported when an optimizer is built, not when cadence is:
    the package pulls in transformers and torch.distributed.tensor at import, seconds that every
    ``cadence`` command (``--help`` included) and every run of another optimizer would pay."""

    def make(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module("pytorch_optimizer"), name)(*args, **kwargs)

    make.__name__ = name
    return make


def _adam_like(
    make: Callable[..., Any], *, beta3: float | None = None, lr_1d: bool = False, **fixed: Any
) -> Callable[..., Any]:
    """A builder for an Adam-shaped optimizer: cadence's groups, lr, betas, eps, weight decay.

    ``beta3`` appends a third beta (AdEMAMix's slow EMA); ``lr_1d`` gives MARS's inner AdamW
    for 1-D tensors the group's LR (its ``lr_1d`` is stored as a factor of the group LR, so the
    schedule reaches it) and no decay of its own (``weight_decay_1d``), keeping cadence's rule.
    """

    def build(
        model: nn.Module,
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        eps: float,
        **_: Any,
    ) -> Any:
        extra = dict(fixed)
        if lr_1d:
            extra.update(lr_1d=lr, weight_decay_1d=0.0)
        return make(
            trainable_groups(model, lr, weight_decay),
            lr=lr,
            betas=betas if beta3 is None else (betas[0], betas[1], beta3),
            eps=eps,
            weight_decay=weight_decay,
            **extra,
        )

    return build


def _quiet_prodigy(*args: Any, **kwargs: Any) -> Any:
    # prodigyopt prints a line about weight decay at every construction; cadence reports its
    # settings in config.yaml, so the print is swallowed rather than shown once per run/trial.
    import prodigyopt  # imported when a Prodigy run is built, as pytorch_optimizer is

    with contextlib.redirect_stdout(io.StringIO()):
        return prodigyopt.Prodigy(*args, **kwargs)


def _build_kron(
    model: nn.Module, *, lr: float, momentum: float, weight_decay: float, **_: Any
) -> Any:
    # Preconditioner updates are drawn with NumPy's global RNG, which checkpoints hold and
    # build_workload seeds, so a run is reproducible and an interrupted one resumes exactly.
    return _from_package("Kron")(
        trainable_groups(model, lr, weight_decay),
        lr=lr,
        momentum=momentum if momentum > 0 else DEFAULT_KRON_MOMENTUM,
        weight_decay=weight_decay,
    )


PACKAGE_OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in [
        OptimizerSpec(
            "prodigy",
            "Prodigy (prodigyopt): learning-rate-free Adam; lr multiplies its estimate (use 1.0).",
            _adam_like(_quiet_prodigy, decouple=True),
            lr_free=True,
            momentum_key="betas",
            shardable=False,
            width_rule=True,
        ),
        OptimizerSpec(
            "dadapt-adam",
            "D-Adaptation Adam (pytorch-optimizer): learning-rate-free; lr multiplies its estimate.",
            _adam_like(_from_package("DAdaptAdam"), weight_decouple=True),
            lr_free=True,
            momentum_key="betas",
            shardable=False,
            width_rule=True,
        ),
        OptimizerSpec(
            "soap",
            "SOAP (pytorch-optimizer): Adam in Shampoo's eigenbasis, preconditioner every 10 steps.",
            _adam_like(_from_package("SOAP")),  # the paper's betas: [0.95, 0.95]
            momentum_key="betas",
            shardable=False,
        ),
        OptimizerSpec(
            "psgd-kron",
            "PSGD-Kron (pytorch-optimizer): Kronecker-factored preconditioned SGD with momentum.",
            _build_kron,
            momentum_key="momentum",
            shardable=False,
        ),
        OptimizerSpec(
            "ademamix",
            "AdEMAMix (pytorch-optimizer): AdamW plus a slow EMA of gradients (beta3 0.9999).",
            # beta3 = 0.9999 and the mixing weight alpha = 5 are the paper's defaults
            _adam_like(_from_package("AdEMAMix"), beta3=0.9999, weight_decouple=True),
            momentum_key="betas",
            shardable=False,
            width_rule=True,
        ),
        OptimizerSpec(
            "mars",
            "MARS (pytorch-optimizer): variance-reduced AdamW (gradient correction, gamma 0.025).",
            _adam_like(_from_package("MARS"), lr_1d=True),
            momentum_key="betas",
            shardable=False,
            width_rule=True,
        ),
    ]
}
