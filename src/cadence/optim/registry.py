"""Name -> optimizer table used by configs, recipes and the trainer.

Every builder takes its parameter groups from :mod:`cadence.optim.groups` and stamps each
group with ``"base_lr"`` (the LR the config asked for that group) and ``"group_name"``. The
trainer never keeps its own copy of the LRs: each step it writes
``group["lr"] = group["base_lr"] * multiplier``, so schedules compose with per-group LRs
(Muon vs. its AdamW half) without knowing about them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import schedulefree
import torch
from torch import nn
from torch.optim import Optimizer

from cadence.optim.base import OptimizerSpec, stamp, trainable_groups
from cadence.optim.chained import AnyOptimizer, ChainedOptimizer
from cadence.optim.group_lr import (
    inner_optimizers,
    lr_multipliers,
    scale_body,
    scale_by_width,
    scale_lora_b,
)
from cadence.optim.groups import muon_split, param_groups
from cadence.optim.lion import Lion
from cadence.optim.packages import PACKAGE_OPTIMIZERS
from cadence.optim.sharded import ShardedAdafactor, ShardedMuon, is_sharded

__all__ = [
    "OPTIMIZERS",
    "AnyOptimizer",
    "OptimizerSpec",
    "build_optimizer",
    "check_hparams",
    "check_width_rule",
    "inner_optimizers",
    "is_schedule_free",
    "set_train_mode",
]

DEFAULT_MUON_MOMENTUM = 0.95
# The device types cadence trains on whose fused Adam/AdamW/SGD kernels torch ships.
FUSED_DEVICES = ("cpu", "cuda")
DEFAULT_SCHEDULE_FREE_SGD_MOMENTUM = 0.9
# optimizer.lr of a learning-rate-free optimizer multiplies its own estimate of the step
LR_FREE_RANGE = (0.1, 10.0)


def _implementation(
    groups: list[dict[str, Any]], fused: bool | None, *, sharded_ok: bool = True
) -> dict[str, bool]:
    """``{"fused": True}`` where torch's fused kernel runs on these parameters, else ``{}``.

    One kernel launch per step instead of a Python loop over tensors: measured 5x faster for
    the default GPT's AdamW step on CPU (benchmarks/optim_step.py), and the win grows on a GPU,
    where the loop's per-tensor launches dominate. It computes the same update with a
    different rounding (~1e-7 relative), so ``optimizer.fused: false`` keeps torch's default
    loop for bit-for-bit comparisons with a plain torch loop. A resumed run keeps the choice it
    was saved with (it is part of the saved param groups), so resume stays exact.
    """
    if fused is False:
        return {}
    params = [p for g in groups for p in g["params"]]
    runs = all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params) and (
        sharded_ok or not any(is_sharded(p) for p in params)
    )
    if fused and not runs:
        raise ValueError(
            "optimizer.fused: torch's fused kernel does not run on these parameters "
            f"(it needs floating-point tensors on {' or '.join(FUSED_DEVICES)}"
            + ("" if sharded_ok else ", not FSDP-sharded")
            + "); set optimizer.fused: null"
        )
    return {"fused": True} if runs else {}


def _check_gd(*, momentum: float, nesterov: bool, **_: Any) -> None:
    if momentum != 0 or nesterov:
        raise ValueError(
            "optimizer.momentum: 'gd' is plain full-batch gradient descent; "
            "use 'sgd' for momentum or nesterov"
        )


def _build_gd(
    model: nn.Module, *, lr: float, weight_decay: float, fused: bool | None, **_: Any
) -> AnyOptimizer:
    groups = trainable_groups(model, lr, weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=0.0, **_sgd_implementation(groups, fused))


def _sgd_implementation(groups: list[dict[str, Any]], fused: bool | None) -> dict[str, bool]:
    # torch's DTensor has no sharding rule for the fused SGD kernel (NotImplementedError at the
    # first step), so FSDP2 runs keep the loop; the fused Adam kernels do have one.
    return _implementation(groups, fused, sharded_ok=False)


def _build_sgd(
    model: nn.Module,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    fused: bool | None,
    **_: Any,
) -> AnyOptimizer:
    # torch's SGD with momentum is heavy ball: v <- mu*v + g ; theta <- theta - lr*v.
    groups = trainable_groups(model, lr, weight_decay)
    return torch.optim.SGD(
        groups, lr=lr, momentum=momentum, nesterov=nesterov, **_sgd_implementation(groups, fused)
    )


def _adam_family(cls: type[Optimizer]) -> Callable[..., AnyOptimizer]:
    def build(
        model: nn.Module,
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        eps: float,
        **kwargs: Any,
    ) -> AnyOptimizer:
        groups = trainable_groups(model, lr, weight_decay)
        # build_optimizer passes fused=False to a family member without a kernel (spec.fused)
        impl = _implementation(groups, kwargs["fused"])
        return cls(groups, lr=lr, betas=betas, eps=eps, **impl)

    return build


def _build_adafactor(model: nn.Module, *, lr: float, weight_decay: float, **_: Any) -> AnyOptimizer:
    # Adafactor's eps/betas mean something else (relative-step clipping, beta2 decay
    # schedule), so the Adam-style knobs are not forwarded; torch's defaults are the paper's.
    # torch.optim.Adafactor, extended to run on FSDP2-sharded parameters.
    return ShardedAdafactor(trainable_groups(model, lr, weight_decay), lr=lr)


def _build_lion(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], **_: Any
) -> AnyOptimizer:
    # betas are used as given; recipes that pick Lion set the paper's (0.9, 0.99) explicitly
    # rather than us guessing whether (0.9, 0.999) was meant or just a leftover default.
    return Lion(trainable_groups(model, lr, weight_decay), lr=lr, betas=betas)


def _build_muon(
    model: nn.Module,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    aux_lr: float,
    fused: bool | None,
    **_: Any,
) -> AnyOptimizer:
    matrices, rest = muon_split(model)
    inner: list[Optimizer] = []
    if matrices:
        # adjust_lr_fn="match_rms_adamw" rescales each orthogonalised update to the RMS an
        # AdamW update would have (0.2 * sqrt(max(fan_in, fan_out))), so the AdamW-scale LR a
        # config already has works for both halves; "original" would need ~50x larger LRs.
        muon_group = {"params": matrices, "weight_decay": weight_decay, "group_name": "muon"}
        inner.append(
            # torch.optim.Muon, extended to orthogonalise FSDP2-sharded matrices whole.
            ShardedMuon(
                stamp([muon_group], lr),
                lr=lr,
                weight_decay=weight_decay,
                # Muon's own default; 0 would disable the momentum it is designed around.
                momentum=momentum if momentum > 0 else DEFAULT_MUON_MOMENTUM,
                nesterov=True,
                adjust_lr_fn="match_rms_adamw",
                # torch's bf16 Newton–Schulz where matrix units run bf16; float32 on CPU,
                # where bf16 matmuls are many times slower (optim/sharded.py says more)
                ns_dtype=torch.float32 if matrices[0].device.type == "cpu" else None,
            )
        )
    if rest:
        restricted = stamp(param_groups(model, weight_decay, only=rest), aux_lr, "adamw_")
        # Only the AdamW half has a fused kernel; torch's Muon is a loop over matrices.
        impl = _implementation(restricted, fused)
        inner.append(torch.optim.AdamW(restricted, lr=aux_lr, betas=betas, eps=eps, **impl))
    if not inner:
        raise ValueError("model has no trainable parameters")
    return ChainedOptimizer(inner)


def _build_sf_adamw(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    **_: Any,
) -> AnyOptimizer:
    return schedulefree.AdamWScheduleFree(
        trainable_groups(model, lr, weight_decay), lr=lr, betas=betas, eps=eps
    )


def _build_sf_sgd(
    model: nn.Module, *, lr: float, momentum: float, weight_decay: float, **_: Any
) -> AnyOptimizer:
    # Schedule-free SGD's "momentum" is its interpolation weight; 0 would make it plain SGD
    # with iterate averaging disabled, so 0 means "use the library's default 0.9".
    mom = momentum if momentum > 0 else DEFAULT_SCHEDULE_FREE_SGD_MOMENTUM
    return schedulefree.SGDScheduleFree(
        trainable_groups(model, lr, weight_decay), lr=lr, momentum=mom
    )


_BUILTIN: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in [
        OptimizerSpec(
            "gd",
            "Full-batch gradient descent (torch SGD, no momentum); one step per pass.",
            _build_gd,
            full_batch=True,
            check=_check_gd,
            fused=True,
        ),
        OptimizerSpec(
            "sgd",
            "Mini-batch SGD (torch); heavy-ball momentum when momentum > 0, optional Nesterov.",
            _build_sgd,
            fused=True,
            momentum_key="momentum",
        ),
        OptimizerSpec(
            "adam",
            "Adam (torch); weight decay is L2 in the gradient.",
            _adam_family(torch.optim.Adam),
            fused=True,
            momentum_key="betas",
            width_rule=True,
        ),
        OptimizerSpec(
            "adamw",
            "AdamW (torch); decoupled weight decay.",
            _adam_family(torch.optim.AdamW),
            fused=True,
            momentum_key="betas",
            width_rule=True,
        ),
        OptimizerSpec(
            "nadam",
            "NAdam (torch): Adam with Nesterov momentum.",
            _adam_family(torch.optim.NAdam),
            momentum_key="betas",
            width_rule=True,
        ),
        OptimizerSpec(
            "radam",
            "RAdam (torch): variance-rectified Adam, no warmup needed.",
            _adam_family(torch.optim.RAdam),
            momentum_key="betas",
            width_rule=True,
        ),
        OptimizerSpec(
            "adafactor", "Adafactor (torch): factored second moments, low memory.", _build_adafactor
        ),
        OptimizerSpec(
            "muon",
            "Muon (torch) on hidden matrices + AdamW on embeddings, head, norms and biases.",
            _build_muon,
            fused=True,
            momentum_key="momentum",
            width_rule=True,
        ),
        OptimizerSpec(
            "lion",
            "Lion (cadence): sign of interpolated momentum; small LR, large WD.",
            _build_lion,
            momentum_key="betas",
            width_rule=True,
        ),
        OptimizerSpec(
            "schedulefree-adamw",
            "Schedule-free AdamW: no LR decay needed; evaluate in eval mode (averaged weights).",
            _build_sf_adamw,
            schedule_free=True,
            momentum_key="betas",
            width_rule=True,
        ),
        OptimizerSpec(
            "schedulefree-sgd",
            "Schedule-free SGD: no LR decay needed; evaluate in eval mode (averaged weights).",
            _build_sf_sgd,
            schedule_free=True,
            momentum_key="momentum",
        ),
    ]
}
# torch's and cadence's own first, then those taken from packages (packages.py)
OPTIMIZERS: dict[str, OptimizerSpec] = {**_BUILTIN, **PACKAGE_OPTIMIZERS}


def check_hparams(
    name: str,
    *,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    aux_lr: float | None = None,
    body_lr_ratio: float = 1.0,
    loraplus_ratio: float = 1.0,
    fused: bool | None = None,
) -> OptimizerSpec:
    """Every rule on an optimizer's settings, in one place: `build_optimizer` runs it, and so
    does the config check, so a bad value is refused before any model or data exists.

    Raises ValueError whose message starts with the config key (``optimizer.momentum: ...``).
    """
    spec = OPTIMIZERS.get(name)
    if spec is None:
        raise ValueError(
            f"optimizer.name: unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}"
        )
    if not lr > 0:
        raise ValueError(f"optimizer.lr: must be > 0, got {lr}")
    lo, hi = LR_FREE_RANGE
    if spec.lr_free and not lo <= lr <= hi:
        raise ValueError(
            f"optimizer.lr: {name} estimates its own step size and lr multiplies that estimate "
            f"(1.0 = as estimated); expected a value in [{lo:g}, {hi:g}], got {lr:g}; "
            "set optimizer.lr=1.0"
        )
    if aux_lr is not None and not aux_lr > 0:
        raise ValueError(f"optimizer.aux_lr: must be > 0, got {aux_lr}")
    if not 0 < body_lr_ratio <= 1:
        raise ValueError(
            f"optimizer.body_lr_ratio: must be in (0, 1] (1 = one lr for all), got {body_lr_ratio}"
        )
    if not loraplus_ratio >= 1:
        raise ValueError(
            "optimizer.loraplus_ratio: must be >= 1 (1 = one lr for A and B; LoRA+ uses ~16), "
            f"got {loraplus_ratio}"
        )
    # Heavy-ball, Muon and schedule-free interpolation weights all diverge or stall at 1.
    if not 0 <= momentum < 1:
        raise ValueError(f"optimizer.momentum: must be in [0, 1), got {momentum}")
    if weight_decay < 0:
        raise ValueError(f"optimizer.weight_decay: must be >= 0, got {weight_decay}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"optimizer.betas: must be two numbers in [0, 1), got {list(betas)}")
    if not eps > 0:
        raise ValueError(f"optimizer.eps: must be > 0, got {eps}")
    if nesterov and momentum == 0 and name == "sgd":
        raise ValueError("optimizer.nesterov: needs optimizer.momentum > 0")
    if fused and not spec.fused:
        have = ", ".join(n for n, s in OPTIMIZERS.items() if s.fused)
        raise ValueError(
            f"optimizer.fused: torch has no fused kernel for {name!r} (it has one for {have}); "
            "set optimizer.fused: null"
        )
    if spec.check is not None:
        spec.check(
            name=name, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )
    return spec


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    aux_lr: float | None = None,
    body_lr_ratio: float = 1.0,
    loraplus_ratio: float = 1.0,
    fused: bool | None = None,
) -> Optimizer | ChainedOptimizer:
    """Build the named optimizer over ``model``'s trainable parameters.

    Errors name the config key (``optimizer.lr``...) so a bad YAML value is found at once.
    Schedule-free optimizers come back already in train mode so the first ``step`` works;
    the trainer still toggles them with :func:`set_train_mode` around evaluation.
    ``fused``: None = torch's fused kernel where it runs on these parameters, True = require
    it, False = torch's default implementation.
    """
    spec = check_hparams(
        name,
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        betas=betas,
        eps=eps,
        aux_lr=aux_lr,
        body_lr_ratio=body_lr_ratio,
        loraplus_ratio=loraplus_ratio,
        fused=fused,
    )
    optimizer = spec.build(
        model,
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        betas=tuple(betas),
        eps=eps,
        aux_lr=lr if aux_lr is None else aux_lr,
        fused=fused if spec.fused else False,  # one statement of which optimizers have a kernel
    )
    if body_lr_ratio != 1.0:
        scale_body(optimizer, model, body_lr_ratio)
    if loraplus_ratio != 1.0:
        scale_lora_b(optimizer, model, loraplus_ratio)
    if lr_multipliers(model):
        check_width_rule(spec.name)
        scale_by_width(optimizer, model)
    if spec.schedule_free:
        set_train_mode(optimizer, True)
    return optimizer


def check_width_rule(name: str) -> None:
    """Refuse μP for an optimizer its per-layer LRs do not hold for (see OptimizerSpec)."""
    spec = OPTIMIZERS.get(name)
    if spec is not None and not spec.width_rule:
        have = ", ".join(n for n, s in OPTIMIZERS.items() if s.width_rule)
        raise ValueError(
            f"model.parametrization: mup's per-layer LRs are the rule for Adam-like updates, "
            f"which {name!r} is not; use one of {have}, or model.parametrization: sp"
        )


def _is_sf(opt: Optimizer) -> bool:
    # Duck-typed so every schedulefree class (and wrappers) qualifies: they all expose
    # train()/eval() and keep a "train_mode" flag in each param group.
    return (
        callable(getattr(opt, "train", None))
        and callable(getattr(opt, "eval", None))
        and any("train_mode" in g for g in opt.param_groups)
    )


def is_schedule_free(optimizer: AnyOptimizer) -> bool:
    """True when evaluation must switch to the averaged weights first."""
    return any(_is_sf(opt) for opt in inner_optimizers(optimizer))


def set_train_mode(optimizer: AnyOptimizer, training: bool) -> None:
    """Put schedule-free optimizers in train mode (stepping) or eval mode (evaluate/save).

    Schedule-free keeps the model's weights at the gradient-evaluation point while training;
    the point worth evaluating or saving is the average, which only eval mode writes into
    the parameters. Other optimizers have one set of weights, so this is a no-op for them.
    """
    for opt in inner_optimizers(optimizer):
        if _is_sf(opt):
            opt.train() if training else opt.eval()
