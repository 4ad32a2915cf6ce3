"""The grouping rules: who gets weight decay, who goes to Muon, every param exactly once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cadence.optim import build_optimizer, muon_split, param_groups


class TinyTransformer(nn.Module):
    """Embedding -> two pre-norm MLP blocks -> LayerNorm -> head (optionally tied)."""

    def __init__(self, vocab: int = 11, dim: int = 8, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(dim),
                    "up": nn.Linear(dim, 2 * dim),
                    "down": nn.Linear(2 * dim, dim),
                }
            )
            for _ in range(2)
        )
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.final_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=not tie)
        if tie:
            self.head.weight = self.embed.weight

    def output_parameter_names(self) -> set[str]:
        return {name for name, _ in self.head.named_parameters(prefix="head")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for b in self.blocks:
            h = h + b["down"](torch.relu(b["up"](b["norm"](h))))
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.final_norm(h))


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_decay_split() -> None:
    model = TinyTransformer()
    groups = param_groups(model, 0.1)
    by_name = {g["group_name"]: g for g in groups}
    assert by_name["decay"]["weight_decay"] == 0.1
    assert by_name["no_decay"]["weight_decay"] == 0.0
    decay, no_decay = _ids(by_name["decay"]["params"]), _ids(by_name["no_decay"]["params"])
    for b in model.blocks:
        assert id(b["up"].weight) in decay and id(b["down"].weight) in decay
        assert id(b["up"].bias) in no_decay
        assert id(b["norm"].weight) in no_decay and id(b["norm"].bias) in no_decay
    assert id(model.embed.weight) in no_decay
    assert id(model.head.weight) in decay
    assert id(model.conv.weight) in decay  # a 3-D kernel is still a weight matrix to decay
    assert id(model.final_norm.weight) in no_decay
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == _ids(model.parameters())


def test_tied_embedding_counted_once_without_decay() -> None:
    model = TinyTransformer(tie=True)
    groups = param_groups(model, 0.1)
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len(_ids(all_params))
    assert sum(p is model.embed.weight for p in all_params) == 1
    no_decay = next(g for g in groups if g["group_name"] == "no_decay")
    assert any(p is model.head.weight for p in no_decay["params"])


def test_frozen_params_excluded_and_empty_groups_dropped() -> None:
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 1, bias=False))
    model[1].weight.requires_grad_(False)
    groups = param_groups(model, 0.5)
    assert [g["group_name"] for g in groups] == ["decay"]
    assert groups[0]["params"] == [model[0].weight]


def test_muon_split_routes_as_specified() -> None:
    model = TinyTransformer()
    muon, adamw = muon_split(model)
    expected_muon = {id(b[k].weight) for b in model.blocks for k in ("up", "down")}
    assert _ids(muon) == expected_muon
    assert all(p.ndim == 2 for p in muon)
    for p in (
        model.embed.weight,
        model.head.weight,
        model.head.bias,
        model.conv.weight,
        model.final_norm.weight,
        model.blocks[0]["up"].bias,
    ):
        assert id(p) in _ids(adamw)
    assert len(muon) + len(adamw) == len(list(model.parameters()))
    assert _ids(muon).isdisjoint(_ids(adamw))
    assert _ids(muon) | _ids(adamw) == _ids(model.parameters())


def test_muon_split_tied_head_goes_to_adamw_once() -> None:
    model = TinyTransformer(tie=True)
    muon, adamw = muon_split(model)
    assert sum(p is model.embed.weight for p in adamw) == 1
    assert all(p is not model.embed.weight for p in muon)
    assert len(muon) == 4


def test_muon_split_without_hidden_matrices() -> None:
    logreg = nn.Linear(5, 3)
    muon, adamw = muon_split(logreg)
    assert muon == []
    assert _ids(adamw) == _ids(logreg.parameters())
    opt = build_optimizer("muon", logreg, lr=1e-2)
    assert len(opt.optimizers) == 1
    assert isinstance(opt.optimizers[0], torch.optim.AdamW)


def test_muon_split_falls_back_to_last_linear_as_head() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    muon, _ = muon_split(mlp)
    assert _ids(muon) == {id(mlp[0].weight), id(mlp[2].weight)}


def test_output_parameter_names_typo_is_an_error() -> None:
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def output_parameter_names(self) -> set[str]:
            return {"fc.wieght"}

    with pytest.raises(ValueError, match="fc.wieght"):
        muon_split(Bad())


def test_muon_optimizer_groups_cover_every_param_once() -> None:
    model = TinyTransformer(tie=True)
    opt = build_optimizer("muon", model, lr=1e-3, weight_decay=0.1)
    seen = [p for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(_ids(seen)) == len(list(model.parameters()))
    names = {g["group_name"]: g for g in opt.param_groups}
    assert set(names) == {"muon", "adamw_decay", "adamw_no_decay"}
    assert names["muon"]["weight_decay"] == 0.1
    assert names["adamw_no_decay"]["weight_decay"] == 0.0
    assert isinstance(opt.optimizers[0], torch.optim.Muon)
    assert opt.optimizers[0].param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    # One forward/backward/step through a model with every kind of parameter must work.
    x = torch.randint(0, 11, (2, 5))
    model(x).sum().backward()
    opt.step()
