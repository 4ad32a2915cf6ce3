"""Private training (DP-SGD on Opacus): the noise against Opacus's own calibration, each
example's clipping against a plain for-loop, the ε budget as a stopping rule, and refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from opacus.accountants.utils import get_noise_multiplier

from cadence.cli import main
from cadence.config import parse_config
from cadence.config.horizon import horizon
from cadence.runtime.distributed import SINGLE
from cadence.training import Trainer, fit
from cadence.training.privacy import (
    _NOISE,
    PrivateGradients,
    _generator,
    epsilon_after,
    resolve_privacy,
)
from cadence.workloads import build_workload
from cli_helpers import as_sets

DIGITS = [
    "workload=digits",
    "model.hidden=[16]",
    "optimizer.name=sgd",
    "optimizer.lr=0.5",
    "batch.size=64",
    "train.max_steps=40",
    "train.eval_every=20",
    "train.log_every=10",
    "train.progress=false",
    "privacy.enabled=true",
]


def _private(*sets: str):
    cfg = parse_config(None, [*DIGITS, *sets])
    w = build_workload(cfg)
    steps = horizon(cfg, w.n_train, w.tokens_per_sample).steps
    return resolve_privacy(cfg, w, steps, SINGLE), w, steps


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_derived_noise_is_opacus_own_calibration(accountant: str) -> None:
    cfg, w, steps = _private("privacy.target_epsilon=2", f"privacy.accountant={accountant}")
    want = get_noise_multiplier(
        target_epsilon=2,
        target_delta=1e-5,
        sample_rate=64 / w.n_train,
        steps=steps,
        accountant=accountant,
    )
    assert cfg.privacy.noise_multiplier == want
    spent = epsilon_after(steps, want, 64 / w.n_train, cfg)
    assert 0.98 * 2 <= spent <= 2 * 1.01  # calibrated to the target within Opacus's tolerance


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_each_example_is_clipped_then_noised_once_per_step(clipping: str) -> None:
    """The private gradient equals (sum of each example's own gradient, clipped alone) / B
    plus the noise, the noise being N(0, (σC)^2) / B from the step's seeded generator. Flat:
    the example's whole gradient clipped to C; per layer: each of its k tensors to C/sqrt(k)."""
    sets = ("privacy.noise_multiplier=0.7", "privacy.max_grad_norm=0.05")
    cfg, w, steps = _private(*sets, f"privacy.clipping={clipping}")
    model = w.model
    trainer = Trainer(cfg, w)
    priv = trainer.privacy
    assert isinstance(priv, PrivateGradients)
    drawn = priv.draw(3)
    micro = [w.batch(drawn[:10]), w.batch(drawn[10:])]  # two micro-batches, accumulated
    priv.backward(micro, len(drawn), step=3)
    got = [p.grad.clone() for p in priv.params]

    k = len(priv.params)
    summed = [torch.zeros_like(p) for p in priv.params]
    norms = []
    for i in drawn.tolist():  # the plain reference: one example at a time
        model.zero_grad(set_to_none=True)
        w.loss_sum(model, w.batch(torch.tensor([i]))).backward()
        grads = [p.grad for p in priv.params]
        if clipping == "flat":
            norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            scales = [min(1.0, 0.05 / (norm + 1e-6))] * k
        else:
            scales = [min(1.0, 0.05 / k**0.5 / (float(g.norm()) + 1e-6)) for g in grads]
        clipped = [g * c for g, c in zip(grads, scales)]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in clipped]))))
        for s, g in zip(summed, clipped):
            s += g
    assert max(norms) <= 0.05 * (1 + 1e-5) and min(norms) > 0.04  # every example is clipped
    gen = _generator(cfg.train.seed, 3, _NOISE)  # the generator step 3's noise comes from
    for p, s, g in zip(priv.params, summed, got):
        noise = torch.normal(0, 0.7 * 0.05, size=p.shape, generator=gen)
        torch.testing.assert_close(g, (s + noise) / 64, rtol=1e-5, atol=1e-7)


def test_the_draw_is_poisson_at_the_sampling_rate_and_a_function_of_the_step() -> None:
    cfg, w, _ = _private("privacy.noise_multiplier=1")
    priv = Trainer(cfg, w).privacy
    sizes = [len(priv.draw(k)) for k in range(200)]
    mean, q = sum(sizes) / len(sizes), 64 / w.n_train
    sd = (w.n_train * q * (1 - q) / len(sizes)) ** 0.5
    assert abs(mean - 64) < 4 * sd and len(set(sizes)) > 5  # sizes vary around the expected B
    assert torch.equal(priv.draw(7), priv.draw(7)) and not torch.equal(priv.draw(7), priv.draw(8))


def test_a_run_resumed_on_fewer_processes_draws_the_same_examples_in_passes_of_its_share():
    """TrainState.pass_size (an elastic job that lost a node) splits the draw into passes no
    larger than each process had; the examples and the loss units are the draw's."""
    cfg, w, _ = _private("privacy.noise_multiplier=1")
    priv = Trainer(cfg, w).privacy
    whole, units = priv.batches(3, cfg.batch.micro_size)  # none: one pass
    share = -(-64 // 2)  # batch.size 64 over the two processes that wrote the checkpoint
    parts, parts_units = priv.batches(3, share)
    assert len(whole) == 1 and units == parts_units == len(priv.draw(3))
    assert len(parts) == -(-units // share)
    torch.testing.assert_close(torch.cat([x for x, _ in parts]), whole[0][0], rtol=0, atol=0)


def test_disabled_privacy_is_bitwise_the_plain_run() -> None:
    def weights(cfg):
        w = build_workload(cfg)
        fit(Trainer(cfg, w))
        return [p.detach().clone() for p in w.model.parameters()]

    plain = parse_config(None, [s for s in DIGITS if not s.startswith("privacy.")])
    off = dataclasses.replace(plain, privacy=dataclasses.replace(plain.privacy, enabled=False))
    for a, b in zip(weights(plain), weights(off)):
        assert torch.equal(a, b)


def _cli(tmp_path, capsys, *sets: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["train", *as_sets([*DIGITS, *sets]), "--run-dir", str(tmp_path / "run")])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_private_run_records_its_noise_and_epsilon(tmp_path, capsys) -> None:
    """With the strategies that compose with privacy: Adam, a cosine schedule with warmup, the
    loss-driven plateau on validation loss, and an EMA of the weights (post-processing)."""
    sets = ("privacy.target_epsilon=3", "privacy.accountant=rdp", "optimizer.name=adamw")
    sets += ("optimizer.lr=0.01", "schedule.name=cosine", "schedule.warmup=5")
    sets += ("plateau.enabled=true", "train.ema=0.9")
    code, err = _cli(tmp_path, capsys, *sets)
    assert code == 0, err
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    p = summary["privacy"]
    assert summary["steps"] == 40 and p["steps"] == 40
    assert p["epsilon"] <= 3 * 1.01 and p["noise_multiplier"] > 0
    recorded = parse_config(run / "config.yaml")  # a resolved config loads again as it is
    assert recorded.privacy.noise_multiplier == p["noise_multiplier"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in rows if "epsilon" in r]
    assert len(eps) == 4 and eps == sorted(eps) and eps[-1] == pytest.approx(p["epsilon"])


def test_max_epsilon_stops_at_the_last_step_within_it(tmp_path, capsys) -> None:
    cfg, w, _ = _private("privacy.noise_multiplier=1.0", "privacy.accountant=rdp")
    rate = 64 / w.n_train
    # a budget between the ε of 20 and of 21 steps: the run must end at step 20
    budget = (epsilon_after(20, 1.0, rate, cfg) + epsilon_after(21, 1.0, rate, cfg)) / 2
    sets = (
        "privacy.noise_multiplier=1.0",
        "privacy.accountant=rdp",
        f"privacy.max_epsilon={budget}",
    )
    code, err = _cli(tmp_path, capsys, *sets)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "privacy_budget" and summary["steps"] == 20
    p = summary["privacy"]
    assert p["last_step_within_max_epsilon"] == 20 and p["epsilon"] <= budget


@pytest.mark.parametrize(
    ("sets", "start"),
    [
        (["privacy.target_epsilon=3", "batch.size=full"], "batch.size: full cannot be sampled"),
        (["privacy.target_epsilon=3", "batch.schedule=[[0.5, 128]]"], "batch.schedule: "),
        ([], "privacy.target_epsilon: give privacy.target_epsilon"),
        (["privacy.target_epsilon=3", "privacy.delta=0.01"], "privacy.delta: 0.01 is above 1 /"),
        (["privacy.target_epsilon=3", "optimizer.lr=auto"], "optimizer.lr: auto measures"),
        (["privacy.target_epsilon=3", "batch.size=5000"], "batch.size: 5000 samples of"),
        (["privacy.noise_multiplier=0.5", "privacy.target_epsilon=0.1"],
         "privacy.noise_multiplier: 0.5 spends"),
        (["privacy.enabled=false", "privacy.max_epsilon=2"], "privacy.max_epsilon: set while"),
        (["privacy.target_epsilon=3", "train.on_spike=skip"], "train.on_spike: skip decides"),
        (["privacy.target_epsilon=3", "train.on_nonfinite=rollback",
          "train.checkpoint_every=5"], "train.on_nonfinite: rollback decides"),
    ],
)  # fmt: skip
def test_what_would_break_the_guarantee_is_one_line_exit_2(tmp_path, capsys, sets, start):
    code, err = _cli(tmp_path, capsys, *sets)
    err = [line for line in err if not line.startswith("cadence: preparing")]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"cadence: error: {start}"), err
    assert not (tmp_path / "run").exists()


def test_a_layer_that_mixes_examples_is_refused_naming_it() -> None:
    from torch import nn

    from cadence.config import ConfigError
    from cadence.training.privacy import check_private_model

    with pytest.raises(ConfigError, match=r"^privacy.enabled: .*BatchNorm") as info:
        check_private_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    assert "\n" not in str(info.value)
    check_private_model(nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4)))  # GroupNorm is fine


def test_cadences_gpt_trains_privately_with_muon() -> None:
    """Embeddings, linear layers and norms: per-example gradients for the whole GPT, and the
    default recipe's Muon stepping on the private gradient."""
    cfg = parse_config(
        None,
        [
            "workload=lm",
            *("model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.seq_len=16"),
            *("data.max_bytes=100000", "train.eval_samples=16", "optimizer.name=muon"),
            *("batch.size=16", "train.max_steps=8", "train.progress=false"),
            *("privacy.enabled=true", "privacy.target_epsilon=8"),
        ],
    )
    w = build_workload(cfg)
    cfg = resolve_privacy(cfg, w, 8, SINGLE)
    before = [p.detach().clone() for p in w.model.parameters()]
    summary = fit(Trainer(cfg, w))
    assert summary["steps"] == 8 and summary["privacy"]["epsilon"] <= 8 * 1.01
    assert all(not torch.equal(a, p) for a, p in zip(before, w.model.parameters()))


def test_resume_from_a_checkpoint_is_bitwise_the_uninterrupted_run(tmp_path, capsys) -> None:
    import shutil

    sets = ("privacy.target_epsilon=3", "privacy.accountant=rdp", "train.checkpoint_every=20")
    sets += ("train.keep_checkpoints=3",)
    code, err = _cli(tmp_path, capsys, *sets)
    assert code == 0, err
    whole, part = tmp_path / "run", tmp_path / "part"
    shutil.copytree(whole, part)  # the run as it was at step 20: later files removed
    shutil.rmtree(part / "checkpoints" / "step_00000040")
    for name in ("model.safetensors", "summary.json"):
        (part / name).unlink()
    rows = (part / "metrics.jsonl").read_text().splitlines()
    kept = [r for r in rows if json.loads(r)["step"] <= 20]
    (part / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    assert main(["train", "--resume", str(part)]) == 0
    assert (part / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    a, b = (json.loads((d / "summary.json").read_text())["privacy"] for d in (whole, part))
    assert a["epsilon"] == b["epsilon"] and a["noise_multiplier"] == b["noise_multiplier"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hugging_face_models_train_privately_or_are_refused_naming_the_layer(
    tmp_path, capsys, arch: str
) -> None:
    """Llama's layers all have per-example gradients; GPT-2's position embeddings get one row
    of positions for the whole batch, so no gradient of theirs belongs to one example."""
    from hf_models import HF_RUN, SPECS, hf_config_set

    sets = [*HF_RUN, hf_config_set(SPECS[arch]), "train.max_steps=3", "optimizer.name=adamw"]
    sets += ["privacy.enabled=true", "privacy.target_epsilon=8", "privacy.accountant=rdp"]
    capsys.readouterr()
    code = main(["train", *as_sets(sets), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    if arch == "llama":
        assert code == 0, err
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["steps"] == 3 and summary["privacy"]["epsilon"] <= 8 * 1.01
    else:
        err = [line for line in err if not line.startswith("cadence: preparing")]
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith("cadence: error: privacy.enabled: the model cannot train")
        assert "wpe.weight" in err[0] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["find-lr", "find-batch"])
def test_measuring_commands_refuse_a_private_config(tmp_path, capsys, command: str) -> None:
    """Their steps would read the training data without privacy: they run on public data."""
    capsys.readouterr()
    sets = [*DIGITS, "privacy.target_epsilon=3"]
    code = main([command, *as_sets(sets), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"cadence: error: privacy.enabled: {command} measures on the")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "sets",
    [
        ["workload=mnist", "model.arch=cnn", "train.eval_samples=64"],  # conv, pooling, linear
        ["workload=speech", "data.voices=2", "model.channels=[8,16]"],  # conv with GroupNorm
    ],
    ids=["mnist-cnn", "speech-groupnorm-cnn"],
)
def test_convolutional_models_train_privately(sets: list[str]) -> None:
    cfg = parse_config(
        None,
        [*sets, "optimizer.name=sgd", "optimizer.lr=0.5", "batch.size=16", "train.max_steps=3"]
        + ["train.progress=false", "privacy.enabled=true", "privacy.noise_multiplier=1.0"]
        + [f"privacy.delta={1e-5 if 'mnist' in sets[0] else 1e-3}", "privacy.accountant=rdp"],
    )
    w = build_workload(cfg)
    cfg = resolve_privacy(cfg, w, 3, SINGLE)
    before = [p.detach().clone() for p in w.model.parameters()]
    summary = fit(Trainer(cfg, w))
    assert summary["steps"] == 3 and summary["privacy"]["epsilon"] > 0
    assert all(not torch.equal(a, p) for a, p in zip(before, w.model.parameters()))


def test_a_users_dataset_workload_trains_privately(tmp_path) -> None:
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset

    import cadence

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 5, generator=g), torch.randint(0, 3, (400,), generator=g)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    w = cadence.DatasetWorkload(
        model, TensorDataset(x[:300], y[:300]), TensorDataset(x[300:], y[300:]), F.cross_entropy
    )
    sets = ["batch.size=32", "train.max_steps=5", "train.progress=false", "optimizer.name=sgd"]
    sets += ["privacy.enabled=true", "privacy.target_epsilon=4", "privacy.delta=1e-3"]
    sets += ["privacy.accountant=rdp"]
    summary = cadence.train(
        parse_config(None, sets), run_dir=tmp_path / "run", workload=w, plots=False
    )
    assert summary["steps"] == 5 and summary["privacy"]["epsilon"] <= 4 * 1.01
    assert summary["privacy"]["sample_rate"] == 32 / 300
