"""μP for cadence's GPT: the coordinate check, and that μP is SP exactly at its base width.

The coordinate check (Yang et al., Tensor Programs V, appendix) trains a few steps at several
widths and measures how far each layer's activations have moved from their values at init, per
coordinate. Under the standard parametrization with Adam, a hidden matrix's update is lr per
entry summed over a fan-in that grows with the width, so the change grows like width^1; under
μP every layer's change is width^0. The test fits the slope of log(change) against log(width)
and holds each parametrization to the side of 0.5 its theory puts it on.
"""

from __future__ import annotations

import math

import pytest
import torch

from cadence import load_config
from cadence.config import ConfigError
from cadence.models.gpt import GPT, GPTConfig
from cadence.optim import OPTIMIZERS, build_optimizer

BASE = 64
WIDTHS = (64, 128, 256)


def _model(width: int, parametrization: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=64,
        seq_len=32,
        n_layer=2,
        n_head=4,
        d_model=width,
        parametrization=parametrization,
        base_width=BASE,
    )
    return GPT(cfg)


def _activations(model: GPT, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each block's attention and MLP output, and the logits, for input ``x``."""
    out: dict[str, torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(model.blocks):
        for part in ("attn", "mlp"):

            def keep(_m, _i, y, key=f"{i}.{part}"):
                out[key] = y.detach()

            hooks.append(getattr(block, part).register_forward_hook(keep))
    with torch.no_grad():
        out["logits"] = model(x)
    for h in hooks:
        h.remove()
    return out


def _change_after_training(width: int, parametrization: str) -> dict[str, float]:
    """Mean |activation - activation at init| per coordinate after 3 AdamW steps."""
    model = _model(width, parametrization)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (8, 33), generator=gen)
    inputs, targets = x[:, :-1], x[:, 1:]
    before = _activations(model, inputs)
    opt = build_optimizer("adamw", model, lr=1e-2, fused=False)
    for _ in range(3):
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _activations(model, inputs)
    return {k: (after[k] - before[k]).abs().mean().item() for k in before}


def _slopes(parametrization: str) -> dict[str, float]:
    """Least-squares slope of log(change) against log(width), per activation."""
    changes = [_change_after_training(w, parametrization) for w in WIDTHS]
    xs = [math.log(w) for w in WIDTHS]
    mx = sum(xs) / len(xs)
    slopes = {}
    for key in changes[0]:
        ys = [math.log(c[key]) for c in changes]
        my = sum(ys) / len(ys)
        num = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True))
        slopes[key] = num / sum((a - mx) ** 2 for a in xs)
    return slopes


def test_coordinate_check_activations_move_alike_at_every_width_under_mup() -> None:
    mup = _slopes("mup")
    sp = _slopes("sp")
    # μP: width^0 for every layer and the logits; SP: width^1 (Adam's per-entry updates summed
    # over a fan-in that grows). 0.5 is halfway between the two exponents.
    assert all(abs(s) < 0.5 for s in mup.values()), mup
    hidden_sp = [s for k, s in sp.items() if k != "logits"]
    assert min(hidden_sp) > 0.5, sp
    assert sp["logits"] > 0.5, sp


def test_mup_at_its_base_width_is_the_standard_parametrization_to_the_bit() -> None:
    x = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    runs = []
    for p in ("sp", "mup"):
        model = _model(BASE, p)
        opt = build_optimizer("adamw", model, lr=1e-2, fused=False)
        for _ in range(2):
            loss = model(x).logsumexp(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        runs.append(model(x))
    assert torch.equal(runs[0], runs[1])


def test_mup_init_divides_hidden_std_by_sqrt_width_mult_and_keeps_embeddings() -> None:
    sp, mup = _model(256, "sp"), _model(256, "mup")
    m = 256 / BASE
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc.weight", "blocks.0.mlp.proj.weight"):
        ratio = dict(sp.named_parameters())[name].std() / dict(mup.named_parameters())[name].std()
        assert ratio.item() == pytest.approx(math.sqrt(m), rel=0.02)
    assert torch.equal(sp.tok_emb.weight, mup.tok_emb.weight)


@pytest.mark.parametrize("name", sorted(n for n, s in OPTIMIZERS.items() if s.width_rule))
def test_hidden_matrices_step_at_lr_over_width_mult_for_every_adam_like_optimizer(
    name: str,
) -> None:
    model = _model(256, "mup")
    m = 256 / BASE
    lr = 1.0 if OPTIMIZERS[name].lr_free else 1e-3  # the lr-free ones take a multiplier
    opt = build_optimizer(name, model, lr=lr, aux_lr=lr)
    hidden = {id(p) for n, p in model.named_parameters() if n in model.lr_multipliers()}
    assert len(hidden) == 4 * 2
    inner = getattr(opt, "optimizers", [opt])
    seen = set()
    for o in inner:
        for g in o.param_groups:
            for p in g["params"]:
                want = lr / m if id(p) in hidden else lr
                assert g["lr"] == pytest.approx(want), (g["group_name"], want)
                assert g["base_lr"] == pytest.approx(want)
                seen.add(id(p))
    assert seen == {id(p) for p in model.parameters()}


def test_mup_refuses_an_optimizer_its_rule_does_not_hold_for() -> None:
    with pytest.raises(ValueError, match=r"model.parametrization: .*'sgd'"):
        build_optimizer("sgd", _model(128, "mup"), lr=0.1)


def test_mup_splits_off_the_hidden_matrices_only_away_from_its_base_width() -> None:
    names = [
        [g["group_name"] for g in build_optimizer("adamw", _model(w, p), lr=1e-3).param_groups]
        for w, p in ((BASE, "sp"), (BASE, "mup"), (4 * BASE, "mup"))
    ]
    assert names[0] == names[1] == ["decay", "no_decay"]
    assert names[2] == ["decay_width", "no_decay"]


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["workload=mnist", "model.parametrization=mup"], "model.parametrization: mup is built"),
        (["model.parametrization=mup", "optimizer.name=sgd"], "model.parametrization: .*'sgd'"),
        (["model.parametrization=mup", "model.base_width=2"], "model.base_width"),
        (["model.parametrization=wide"], "model.parametrization"),
    ],
)
def test_bad_mup_configs_fail_with_the_key_to_fix(sets: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config("default", sets)
