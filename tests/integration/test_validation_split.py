"""`data.val_fraction` and `train.eval_samples` mean the same thing for every workload.

They used to be honoured by the text workload only; images and logistic regression held out a
fixed 20% and evaluated all of it, whatever the config said.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cadence.data import load_breast_cancer_split, load_digits, load_mnist
from cadence.workloads import build_workload

SIZES = {"mnist": len(load_mnist()[0]), "digits": len(load_digits()[0])}


@pytest.mark.parametrize("workload", ["mnist", "digits", "logreg"])
def test_val_fraction_sets_the_held_out_share(make_config, workload):
    n = SIZES.get(workload) or sum(len(t) for t in load_breast_cancer_split()[::2])
    w = build_workload(make_config(workload, "data.val_fraction=0.1"))
    assert len(w.x_val) == round(0.1 * n)
    assert len(w.x_train) == n - round(0.1 * n)
    default = build_workload(make_config(workload))  # null: the workload's own 20%
    assert len(default.x_val) == round(0.2 * n)


@pytest.mark.parametrize("workload", ["mnist", "digits"])
def test_eval_samples_caps_the_evaluation_of_classifiers(make_config, workload):
    w = build_workload(make_config(workload, "train.eval_samples=50"))
    assert w.n_val == 50 < len(w.x_val)
    got = w.evaluate(w.model)
    with torch.no_grad():
        logits = w.model(w.x_val[:50]).float()
        loss = F.cross_entropy(logits, w.y_val[:50]).item()
        acc = (logits.argmax(-1) == w.y_val[:50]).double().mean().item()
    assert math.isclose(got["val_loss"], loss, rel_tol=1e-5)
    assert got["val_accuracy"] == acc


def test_eval_samples_caps_the_validation_metrics_of_logreg(make_config):
    w = build_workload(make_config("logreg", "train.eval_samples=40"))
    got = w.evaluate(w.model)
    with torch.no_grad():
        logits = w.model(w.x_val[:40])
        loss = F.binary_cross_entropy_with_logits(logits, w.y_val[:40]).item()
    assert math.isclose(got["val_loss"], loss, rel_tol=1e-12)
    # The objective (and so the suboptimality) is over the whole training set, as before.
    assert got["objective"] == w.objective(w.model)
