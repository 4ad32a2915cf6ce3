"""`cadence.keras`: cadence's schedules and callbacks in Keras' own `fit`, checked against the
pure functions of `cadence.schedules`.

TensorFlow and torch never share a process: the checks run in two children of this file (run
as a script), one under ``KERAS_BACKEND=tensorflow`` and one under ``torch``, each printing one
JSON line. Expected values are computed here, in the parent, with cadence's own functions
(the children never see them except as the reference a run is compared with), at every step of
a short horizon and a few past its end (where the table holds its last step).

The live-value checks compare a compiled (graph) run with an eager run whose optimizer is given
the expected values as plain floats at every step: equal weights mean the compiled step used
the scheduled values, not the floats it was traced with.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from cadence.schedules import SCHEDULES, Plateau, build_schedule
from cadence.schedules.checks import COOLDOWNS
from cadence.schedules.hparams import piecewise_linear

N, PEAK, PAST = 20, 0.3, 3  # horizon, peak LR, steps evaluated past the horizon
# Every shared key set away from its default, so each body's own parameters matter.
COMMON = {
    "gamma": 0.5,
    "min_lr_ratio": 0.1,
    "power": 2.0,
    "step_size": 4,
    "milestones": [4, 9],
    "decay_fraction": 0.3,
}
FIT_STEPS, FIT_LR = 12, 0.1  # 32 samples, batches of 8, 3 epochs
FIT_SCHEDULE = {"name": "cosine", "warmup": 2, "params": {"min_lr_ratio": 0.1}}
MOMENTUM = [[0, 0.5], [0.25, 0.95], [1.0, 0.8]]  # a fraction position: a share of FIT_STEPS
DECAY, BASE_DECAY = [[0, 1.0], [6, 0.5], [1.0, 0.0]], 0.2
PLATEAU = {"factor": 0.5, "patience": 1, "threshold": 0.01, "cooldown": 1, "min_scale": 0.1}
# in fit: only a loss 10 below the best counts as better, so epochs 2 and 3 are plateaus
FIT_PLATEAU = {"patience": 0, "threshold": 10.0, "threshold_mode": "abs"}
LOSSES = [1.0, 0.9, 0.95, 0.93, 0.92, 0.91, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6]
# float32 rounding of an LR <= 0.3 (ulp 3e-8); weights after 12 steps in graph vs eager
VALUE_TOL, WEIGHT_TOL = 1e-6, 1e-5

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("keras") is None or importlib.util.find_spec("tensorflow") is None,
    reason="keras and tensorflow are not installed",
)


def cases() -> list[dict[str, Any]]:
    """Every registered schedule with and without warmup, and wsd with each cooldown shape."""
    found = []
    for name in SCHEDULES:
        for warmup in (0, 3):
            for cooldown in COOLDOWNS if name == "wsd" else ("linear",):
                params = {**COMMON, "cooldown": cooldown}
                found.append({"name": name, "warmup": warmup, "params": params})
    return found


def closed_form(case: dict[str, Any], total: int, peak: float, steps: int) -> list[float]:
    fn = build_schedule(case["name"], total_steps=total, warmup=case["warmup"], **case["params"])
    return [peak * fn(min(t, total)) for t in range(steps)]


def fit_expected() -> dict[str, list[float]]:
    momentum = piecewise_linear(MOMENTUM, FIT_STEPS, "m", low=0.0, high=1.0, high_open=True)
    decay = piecewise_linear(DECAY, FIT_STEPS, "wd", low=0.0, high=float("inf"))
    lr = closed_form(FIT_SCHEDULE, FIT_STEPS, FIT_LR, FIT_STEPS)
    return {
        "lrs": lr,
        "momenta": [momentum(t) for t in range(FIT_STEPS)],
        "decays": [BASE_DECAY * decay(t) for t in range(FIT_STEPS)],
        "lr_decays": [BASE_DECAY * v / FIT_LR for v in lr],
    }


def plateau_scales(losses: list[float], **settings: Any) -> list[float]:
    plateau = Plateau(**settings)
    scales = []
    for loss in losses:
        plateau.update(loss)
        scales.append(plateau.scale)
    return scales


def run_child(role: str, payload: dict[str, Any]) -> dict[str, Any]:
    env = {
        **os.environ,
        "KERAS_BACKEND": role,
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "OMP_NUM_THREADS": "1",
        "TF_NUM_INTRAOP_THREADS": "1",
        "TF_NUM_INTEROP_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, __file__, role, json.dumps(payload)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("keras") / "model.keras"
    return {"cases": cases(), "expected": fit_expected(), "model_path": str(path)}


@pytest.fixture(scope="module")
def tf_run(payload: dict[str, Any]) -> dict[str, Any]:
    return run_child("tensorflow", payload)


@pytest.fixture(scope="module")
def torch_run(payload: dict[str, Any], tf_run: dict[str, Any]) -> dict[str, Any]:
    return run_child("torch", payload)  # after tf_run: it reloads the model that one saved


def assert_close(got: list[float], want: list[float], tol: float, what: str) -> None:
    assert len(got) == len(want), what
    worst = max(abs(g - w) for g, w in zip(got, want))
    assert worst <= tol, f"{what}: off by {worst:g} (got {got}, want {want})"


def check_values(run: dict[str, Any]) -> None:
    assert len(run["values"]) == len(cases())
    for case, got in zip(cases(), run["values"]):
        want = closed_form(case, N, PEAK, N + PAST)
        assert_close(got, want, VALUE_TOL, f"{case['name']} warmup={case['warmup']}")


def test_compiled_tensorflow_values_equal_the_closed_forms(tf_run: dict[str, Any]) -> None:
    assert not tf_run["torch_loaded"], "cadence.keras pulled torch into a TensorFlow process"
    check_values(tf_run)


def test_torch_backend_values_equal_the_closed_forms(torch_run: dict[str, Any]) -> None:
    assert not torch_run["tensorflow_loaded"]
    check_values(torch_run)


def test_fit_trains_with_the_schedule_lrs(tf_run: dict[str, Any]) -> None:
    fit = tf_run["fit"]
    assert fit["steps"] == list(range(FIT_STEPS))
    assert_close(fit["lrs"], fit_expected()["lrs"], VALUE_TOL, "LR logged by model.fit")
    assert fit["vs_reference"] <= WEIGHT_TOL, "the compiled step did not use these LRs"
    assert fit["vs_constant"] > 100 * WEIGHT_TOL  # the reference tells schedules apart


def test_saved_model_reloads_with_its_schedule(
    tf_run: dict[str, Any], torch_run: dict[str, Any]
) -> None:
    config = tf_run["saved_config"]
    assert config["schedule"] == FIT_SCHEDULE["name"] and config["total_steps"] == FIT_STEPS
    want = closed_form(FIT_SCHEDULE, FIT_STEPS, FIT_LR, FIT_STEPS + PAST)
    for where, run in (("same process", tf_run), ("fresh torch process", torch_run)):
        assert run["reloaded_config"] == config, where
        assert_close(run["reloaded_values"], want, VALUE_TOL, f"reloaded ({where})")


def test_momentum_and_weight_decay_follow_cadence(
    tf_run: dict[str, Any], torch_run: dict[str, Any]
) -> None:
    want = fit_expected()
    for key in ("momenta", "decays"):
        got = tf_run["hparams"][key]
        assert_close(got["values"], want[key], VALUE_TOL, key)
        assert got["vs_reference"] <= WEIGHT_TOL, f"{key}: the compiled step ignored them"
        assert got["vs_constant"] > 100 * WEIGHT_TOL
    assert_close(tf_run["hparams"]["lr_decays"], want["lr_decays"], VALUE_TOL, "weight_decay=lr")
    assert_close(torch_run["momenta"], want["momenta"], VALUE_TOL, "momentum (torch backend)")


def test_plateau_lowers_the_lr_as_cadence_does(tf_run: dict[str, Any]) -> None:
    scales = plateau_scales(LOSSES, **PLATEAU)
    assert min(scales) < 1.0  # the sequence does plateau
    fixed = tf_run["plateau"]
    assert_close(fixed["fixed"], [FIT_LR * s for s in scales], VALUE_TOL, "fixed LR")
    first = closed_form(FIT_SCHEDULE, FIT_STEPS, FIT_LR, 1)[0]
    assert_close(fixed["scheduled"], [first * s for s in scales], VALUE_TOL, "scheduled LR")
    # In a compiled fit: the LR of each epoch's steps is the scale after the previous epoch.
    run = tf_run["plateau_fit"]
    per_epoch = [1.0, *plateau_scales(run["losses"], **FIT_PLATEAU)]
    want = [FIT_LR * per_epoch[t // 4] for t in range(FIT_STEPS)]
    assert_close(run["lrs"], want, VALUE_TOL, "plateau in fit")
    assert per_epoch[-1] < 1.0
    assert run["vs_reference"] <= WEIGHT_TOL, "the compiled step ignored the plateau scale"


def test_bad_input_is_refused_naming_the_argument(torch_run: dict[str, Any]) -> None:
    errors = torch_run["errors"]
    for call, key in [
        ("unknown name", "schedule.name"),
        ("total_steps 0", "total_steps"),
        ("warmup past the horizon", "schedule.warmup"),
        ("warmup fraction 1.5", "warmup"),
        ("peak_lr 0", "peak_lr"),
        ("unknown parameter", "decay"),
        ("momentum 1.2", "momentum"),
        ("points without total_steps", "total_steps"),
    ]:
        kind, message = errors[call]
        assert kind == "ValueError" and message.startswith(f"{key}:"), (call, kind, message)


def test_config_entry_points_match_the_trainer(torch_run: dict[str, Any]) -> None:
    config = torch_run["config"]
    assert sorted(config["checked"]) == sorted(SCHEDULES)
    assert config["worst"] <= VALUE_TOL
    assert config["callbacks"] == ["HyperparamCallback", "PlateauCallback"]


# --------------------------------------------------------------------------- the children


def _values(ck: Any, cases: list[dict[str, Any]], compiled: Any) -> list[list[float]]:
    """Each case's LR at every step, read through ``compiled(schedule)``."""
    out = []
    for case in cases:
        lr = ck.schedule(
            case["name"], peak_lr=PEAK, total_steps=N, warmup=case["warmup"], **case["params"]
        )
        call = compiled(lr)
        out.append([float(call(t)) for t in range(N + PAST)])
    return out


def _model(keras: Any, optimizer: Any, eager: bool = False) -> Any:
    # Seeded initializers, not keras.utils.set_random_seed: that one imports TensorFlow.
    init = keras.initializers.GlorotUniform
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh", kernel_initializer=init(seed=1)),
            keras.layers.Dense(1, kernel_initializer=init(seed=2)),
        ]
    )
    model.compile(optimizer, "mse", run_eagerly=eager)
    return model


def _fit(keras: Any, model: Any, callbacks: list[Any]) -> tuple[Any, list[dict[str, float]]]:
    """Fit 3 epochs of 4 steps; rows of what the optimizer holds before each step."""
    import numpy as np

    rows: list[dict[str, float]] = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            opt = self.model.optimizer
            row = {"step": int(opt.iterations), "lr": float(opt.learning_rate)}
            for attr in ("momentum", "weight_decay"):
                if getattr(opt, attr, None) is not None:  # the value a tensor op reads
                    live = keras.ops.cast(getattr(opt, attr), "float32")
                    row[attr] = float(keras.ops.convert_to_numpy(live))
            rows.append(row)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [0.0]])).astype("float32")
    history = model.fit(
        x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[*callbacks, Record()]
    )
    weights = np.concatenate([np.ravel(w) for w in model.get_weights()])
    return (weights, history), rows


def _setter(keras: Any, attr: str, values: list[float]) -> Any:
    """The reference: plain floats written before each step of an eager run."""

    class Set(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            setattr(self.model.optimizer, attr, values[int(self.model.optimizer.iterations)])

    return Set()


def _against(
    keras: Any, graph: Any, make_opt: Any, attr: str, values: list[float]
) -> dict[str, float]:
    """How far a compiled run's weights are from the eager reference, and from a run that holds
    the first value throughout (which shows the reference can tell them apart)."""
    import numpy as np

    (ref, _), _ = _fit(keras, _model(keras, make_opt(), True), [_setter(keras, attr, values)])
    flat = [values[0]] * len(values)
    (const, _), _ = _fit(keras, _model(keras, make_opt(), True), [_setter(keras, attr, flat)])
    return {
        "vs_reference": float(np.abs(graph - ref).max()),
        "vs_constant": float(np.abs(graph - const).max()),
    }


def tensorflow_child(payload: dict[str, Any]) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    import cadence.keras as ck

    out: dict[str, Any] = {}
    step = tf.TensorSpec([], tf.int64)

    def compiled(lr: Any) -> Any:  # one XLA program per schedule, fed a step tensor as Keras does
        fn = tf.function(lr.__call__, input_signature=[step], jit_compile=True)
        return lambda t: fn(tf.constant(t, tf.int64))

    out["values"] = _values(ck, payload["cases"], compiled)
    want = payload["expected"]
    f = FIT_SCHEDULE

    def schedule() -> Any:
        return ck.schedule(
            f["name"], peak_lr=FIT_LR, total_steps=FIT_STEPS, warmup=f["warmup"], **f["params"]
        )

    model = _model(keras, keras.optimizers.SGD(schedule()))
    (weights, _), rows = _fit(keras, model, [])
    out["fit"] = {"steps": [r["step"] for r in rows], "lrs": [r["lr"] for r in rows]}
    out["fit"] |= _against(
        keras, weights, lambda: keras.optimizers.SGD(FIT_LR), "learning_rate", want["lrs"]
    )
    model.save(payload["model_path"])
    reloaded = keras.models.load_model(payload["model_path"]).optimizer._learning_rate
    out["saved_config"] = model.optimizer._learning_rate.get_config()
    out["reloaded_config"] = reloaded.get_config()
    out["reloaded_values"] = [float(reloaded(t)) for t in range(FIT_STEPS + PAST)]

    hparams: dict[str, Any] = {}
    for key, attr, make, cb in [
        (
            "momenta",
            "momentum",
            lambda: keras.optimizers.SGD(0.05, momentum=0.5),
            ck.HyperparamCallback(momentum=MOMENTUM, total_steps=FIT_STEPS),
        ),
        (
            "decays",
            "weight_decay",
            lambda: keras.optimizers.AdamW(0.01, weight_decay=BASE_DECAY),
            ck.HyperparamCallback(weight_decay=DECAY, total_steps=FIT_STEPS),
        ),
    ]:
        (weights, _), rows = _fit(keras, _model(keras, make()), [cb])
        hparams[key] = {"values": [r[attr] for r in rows]}
        hparams[key] |= _against(keras, weights, make, attr, want[key])
    opt = keras.optimizers.AdamW(schedule(), weight_decay=BASE_DECAY)
    _, rows = _fit(keras, _model(keras, opt), [ck.HyperparamCallback(weight_decay="lr")])
    hparams["lr_decays"] = [r["weight_decay"] for r in rows]
    out["hparams"] = hparams

    out["plateau"] = {}
    for kind, lr in (("fixed", FIT_LR), ("scheduled", schedule())):
        model = _model(keras, keras.optimizers.SGD(lr))
        cb = ck.PlateauCallback("val_loss", **PLATEAU)
        cb.set_model(model)
        cb.on_train_begin()
        lrs = []
        for epoch, loss in enumerate(LOSSES):
            cb.on_epoch_end(epoch, {"val_loss": loss})
            lrs.append(float(model.optimizer.learning_rate))
        out["plateau"][kind] = lrs
    constant = ck.schedule("constant", peak_lr=FIT_LR, total_steps=FIT_STEPS)
    cb = ck.PlateauCallback("train_loss", **FIT_PLATEAU)
    (weights, history), rows = _fit(keras, _model(keras, keras.optimizers.SGD(constant)), [cb])
    lrs = [r["lr"] for r in rows]
    out["plateau_fit"] = {"losses": history.history["loss"], "lrs": lrs}
    out["plateau_fit"] |= _against(
        keras, weights, lambda: keras.optimizers.SGD(FIT_LR), "learning_rate", lrs
    )
    out["torch_loaded"] = "torch" in sys.modules
    return out


def _error(call: Any) -> tuple[str, str]:
    try:
        call()
    except Exception as e:  # the test names the type it expects
        return type(e).__name__, str(e)
    return "nothing", ""


def torch_child(payload: dict[str, Any]) -> dict[str, Any]:
    import keras

    import cadence.keras as ck
    from cadence.config import parse_config
    from cadence.config.parts import lr_schedule_from

    out: dict[str, Any] = {"values": _values(ck, payload["cases"], lambda s: s)}
    reloaded = keras.models.load_model(payload["model_path"]).optimizer._learning_rate
    out["reloaded_config"] = reloaded.get_config()
    out["reloaded_values"] = [float(reloaded(t)) for t in range(FIT_STEPS + PAST)]

    opt = keras.optimizers.SGD(0.05, momentum=0.5)
    cb = ck.HyperparamCallback(momentum=MOMENTUM, total_steps=FIT_STEPS)
    _, rows = _fit(keras, _model(keras, opt), [cb])
    out["momenta"] = [r["momentum"] for r in rows]

    def sched(**kw: Any) -> Any:
        return ck.schedule(**{"name": "cosine", "peak_lr": 0.1, "total_steps": 10, **kw})

    out["errors"] = {
        call: _error(fn)
        for call, fn in {
            "unknown name": lambda: sched(name="nope"),
            "total_steps 0": lambda: sched(total_steps=0),
            "warmup past the horizon": lambda: sched(warmup=20),
            "warmup fraction 1.5": lambda: sched(warmup=1.5),
            "peak_lr 0": lambda: sched(peak_lr=0.0),
            "unknown parameter": lambda: sched(decay=0.5),
            "momentum 1.2": lambda: ck.HyperparamCallback(momentum=[[0, 1.2]], total_steps=10),
            "points without total_steps": lambda: ck.HyperparamCallback(momentum=[[0, 0.9]]),
        }.items()
    }

    checked, worst = [], 0.0
    for name in SCHEDULES:
        cfg = parse_config(
            None,
            [
                f"schedule.name={name}",
                "schedule.warmup=0.1",
                "schedule.per=epoch",
                "schedule.milestones=[0.2, 0.5]",
                "schedule.step_size=0.25",
                "schedule.cooldown=1-sqrt",
                "schedule.min_lr_ratio=0.05",
                "train.max_steps=40",
                "optimizer.lr=0.2",
            ],
        )
        lr = ck.schedule_from_config(cfg, 30, steps_per_epoch=5)
        trainer = lr_schedule_from(cfg, 5, 30)
        worst = max(worst, *(abs(float(lr(t)) - 0.2 * trainer(min(t, 30))) for t in range(33)))
        checked.append(name)
    cfg = parse_config(
        None,
        [
            "optimizer.name=sgd",
            "optimizer.weight_decay=0.01",
            "schedule.momentum=[[0, 0.85], [0.5, 0.95]]",
            "schedule.weight_decay=lr",
            "plateau.enabled=true",
        ],
    )
    callbacks = [type(c).__name__ for c in ck.callbacks_from_config(cfg, 50)]
    out["config"] = {
        "checked": checked,
        "worst": worst,
        "callbacks": callbacks,
    }
    out["tensorflow_loaded"] = "tensorflow" in sys.modules
    return out


if __name__ == "__main__":
    role, data = sys.argv[1], json.loads(sys.argv[2])
    child = tensorflow_child if role == "tensorflow" else torch_child
    print(json.dumps(child(data)))
