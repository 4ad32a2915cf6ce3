"""What one step does to the weights and the LR: closed-form GD, gradient clipping, the plateau.

Gradient descent on logistic regression is checked against the closed-form update and the descent
lemma, gradient clipping against the clipped closed-form step, and the logged LR against a replay
of the plateau controller over the logged validation losses.
"""

from __future__ import annotations

import numpy as np
import pytest
from trainer_helpers import num, run_fit, smoothness, theta_of

import cadence
from cadence.data import logreg_grad, logreg_loss
from cadence.schedules import Plateau, build_schedule
from cadence.track.metrics import read_metrics
from cadence.training import Trainer
from cadence.workloads import build_workload

# ---------------------------------------------------------------- GD closed form


def test_gd_on_logreg_matches_closed_form_update(make_config) -> None:
    lr, steps = 0.5, 5
    cfg = make_config(
        "logreg",
        "optimizer.name=gd",
        f"optimizer.lr={lr}",
        "batch.size=full",
        f"train.max_steps={steps}",
        "train.log_every=1",
    )
    w = build_workload(cfg)
    x, y = w.x_train.double().numpy(), w.y_train.double().numpy()
    theta = theta_of(w)
    expected_losses, expected_norms = [], []
    for _ in range(steps):
        g = logreg_grad(x, y, theta, w.l2)
        expected_losses.append(logreg_loss(x, y, theta, w.l2))
        expected_norms.append(float(np.linalg.norm(g)))
        theta = theta - lr * g

    _, rows, _ = run_fit(cfg, w)
    np.testing.assert_allclose(theta_of(w), theta, rtol=1e-10, atol=1e-12)
    # Each row reports the loss and gradient norm at the weights the step started from.
    np.testing.assert_allclose([r["train_loss"] for r in rows], expected_losses, rtol=1e-10)
    np.testing.assert_allclose([r["grad_norm"] for r in rows], expected_norms, rtol=1e-10)


def test_gd_with_step_one_over_l_decreases_suboptimality_monotonically(make_config) -> None:
    probe = build_workload(make_config("logreg"))
    big_l = smoothness(probe)
    x, y = probe.x_train.double().numpy(), probe.y_train.double().numpy()
    j0 = logreg_loss(x, y, theta_of(probe), probe.l2)
    cfg = make_config(
        "logreg",
        "optimizer.name=gd",
        f"optimizer.lr={num(1 / big_l)}",
        "batch.size=full",
        "train.max_steps=150",
        "train.log_every=1",
        "train.eval_every=1",
    )
    _, rows, _ = run_fit(cfg)
    gaps = [r["suboptimality"] for r in rows]
    assert len(gaps) == 150
    assert gaps[0] < j0 - probe.j_star
    assert all(b < a for a, b in zip(gaps, gaps[1:]))
    # The descent lemma: J(theta_k+1) <= J(theta_k) - |grad J(theta_k)|^2 / (2L).
    for prev, nxt in zip(rows, rows[1:]):
        bound = prev["train_loss"] - prev["grad_norm"] ** 2 / (2 * big_l)
        assert nxt["train_loss"] <= bound + 1e-12


# ---------------------------------------------------------------- clipping


@pytest.mark.parametrize("clip_ratio", [0.25, 4.0], ids=["clipped", "not-clipped"])
def test_clip_grad_norm_logs_the_pre_clip_norm_and_clips_the_update(
    make_config, clip_ratio: float
) -> None:
    lr, batch = 0.1, 32
    base = ["optimizer.name=sgd", f"optimizer.lr={lr}", f"batch.size={batch}", "train.max_steps=1"]
    w = build_workload(make_config("logreg", *base))
    idx = Trainer(make_config("logreg", *base), w).sampler.indices(0, batch).numpy()
    x, y = w.x_train.double().numpy(), w.y_train.double().numpy()
    theta0 = theta_of(w)
    g = logreg_grad(x[idx], y[idx], theta0, w.l2)
    norm = float(np.linalg.norm(g))
    clip = clip_ratio * norm

    cfg = make_config("logreg", *base, f"train.clip_grad_norm={num(clip)}")
    w = build_workload(cfg)
    assert np.array_equal(theta_of(w), theta0)  # same seed, same start
    _, rows, _ = run_fit(cfg, w)
    delta = theta_of(w) - theta0

    assert rows[0]["grad_norm"] == pytest.approx(norm, rel=1e-10)  # before clipping
    if clip < norm:
        assert float(np.linalg.norm(delta)) == pytest.approx(lr * clip, rel=1e-5)
        np.testing.assert_allclose(delta, -lr * clip * g / norm, rtol=1e-5, atol=1e-12)
    else:
        np.testing.assert_allclose(delta, -lr * g, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- plateau


def test_plateau_scale_follows_a_replayed_plateau(make_config, tmp_path) -> None:
    lr, steps = 0.2, 40
    cfg = make_config(
        "logreg",
        "optimizer.name=sgd",
        f"optimizer.lr={lr}",
        "batch.size=64",
        "schedule.name=cosine",
        "schedule.min_lr_ratio=0.1",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.eval_every=2",
        "plateau.enabled=true",
        "plateau.monitor=val_loss",
        "plateau.patience=1",
        "plateau.threshold=0.05",
        "plateau.factor=0.5",
        "plateau.cooldown=1",
    )
    cadence.train(cfg, run_dir=tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    p = cfg.plateau
    replay = Plateau(
        factor=p.factor,
        patience=p.patience,
        threshold=p.threshold,
        cooldown=p.cooldown,
        min_scale=p.min_scale,
    )
    schedule = build_schedule("cosine", total_steps=steps, min_lr_ratio=cfg.schedule.min_lr_ratio)
    scale_used = 1.0  # the scale in force when the step ran: set by evaluations before it
    for r in rows:
        assert r["lr"] == pytest.approx(lr * schedule(r["step"] - 1) * scale_used, rel=1e-12)
        if "val_loss" in r:
            replay.update(r["val_loss"])
        assert r["plateau_scale"] == replay.scale, r["step"]
        scale_used = r["plateau_scale"]
    assert len(rows) == steps
    assert replay.num_reductions >= 1  # otherwise the test would prove nothing
