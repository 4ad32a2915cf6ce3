"""Config loading: recipes, overrides, and one-line errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cadence import load_config
from cadence.config import (
    Config,
    ConfigError,
    config_from_dict,
    dump_config,
    parse_override,
    recipe_names,
)
from cadence.optim import OPTIMIZERS


def test_every_recipe_loads_and_round_trips_through_yaml(tmp_path):
    assert "default" in recipe_names()
    for name in recipe_names():
        cfg = load_config(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_config(cfg))
        assert load_config(path) == cfg


def test_no_argument_means_default_recipe():
    assert load_config() == load_config("default")


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        "default",
        [
            "optimizer.lr=0.1",
            "batch.size=64",
            "schedule.milestones=[10, 20]",
            "train.target=null",
            "optimizer.nesterov=true",
            "optimizer.momentum=0.9",
            "optimizer.name=sgd",
        ],
    )
    assert cfg.optimizer.lr == 0.1 and isinstance(cfg.optimizer.lr, float)
    assert cfg.batch.size == 64
    assert cfg.schedule.milestones == [10, 20]
    assert cfg.optimizer.nesterov is True
    assert load_config("gd-logreg").batch.size == "full"


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    cfg = load_config(None, ["optimizer.lr=3e-4", "optimizer.eps=1E-12", "train.tol_rel_loss=1e-9"])
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.eps == 1e-12
    assert cfg.train.tol_rel_loss == 1e-9
    path = tmp_path / "c.yaml"
    path.write_text("optimizer: {lr: 5e-3}\n")
    assert load_config(path).optimizer.lr == 5e-3


def test_int_widens_to_float_but_float_does_not_narrow():
    assert load_config(None, ["optimizer.lr=1"]).optimizer.lr == 1.0
    with pytest.raises(ConfigError, match=r"^batch\.size: "):
        load_config(None, ["batch.size=3.5"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("optimizer.lr=-1", "optimizer.lr"),
        ("optimizer.lr=abc", "optimizer.lr"),
        ("optimizer.name=adamx", "optimizer.name"),
        ("schedule.name=cosin", "schedule.name"),
        ("schedule.gamma=1.5", "schedule.gamma"),
        ("schedule.warmup=5000", "schedule.warmup"),
        ("schedule.cooldown=square", "schedule.cooldown"),
        ("plateau.factor=2", "plateau.factor"),
        ("batch.size=0", "batch.size"),
        ("batch.size=half", "batch.size"),
        ("batch.micro_size=0", "batch.micro_size"),
        ("batch.schedule=[[0.5, 0]]", "batch.schedule"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.precision=fp8", "train.precision"),
        ("train.device=tpu", "train.device"),
        ("data.path=/no/such/corpus", "data.path"),
        ("model.d_model=130", "model.d_model"),
        ("model.arch=resnet", "model.arch"),
        ("workload=imagenet", "workload"),
        ("optimizer.learning_rate=0.1", "optimizer.learning_rate"),
        ("trainer.max_steps=3", "trainer"),
        ("optimizer=3", "optimizer"),
        ("optimizer.momentum=0.9", "optimizer.momentum"),  # gd is plain gradient descent
    ],
)
def test_bad_values_name_the_key(override, key):
    recipe = "gd-logreg" if override.startswith("optimizer.momentum") else "default"
    with pytest.raises(ConfigError) as info:
        load_config(recipe, [override])
    message = str(info.value)
    assert message.startswith(f"{key}:") or message.startswith(f"{key}["), message
    assert "\n" not in message


def test_full_batch_gd_needs_full_batch():
    with pytest.raises(ConfigError, match=r"^batch\.size: .*full"):
        load_config("gd-logreg", ["batch.size=32"])


def test_nesterov_needs_momentum():
    with pytest.raises(ConfigError, match=r"^optimizer\.nesterov"):
        load_config("sgd-mnist", ["optimizer.nesterov=true"])


def test_unknown_recipe_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not a file and not a recipe"):
        load_config("no-such-recipe")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: {name: sgd\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_non_finite_numbers_are_rejected():
    for value in (".inf", ".nan"):
        with pytest.raises(ConfigError, match=r"^optimizer\.lr: expected float"):
            load_config(None, [f"optimizer.lr={value}"])


def test_override_syntax():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("batch.size=full") == (["batch", "size"], "full")
    for bad in ("optimizer.lr", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="--set"):
            parse_override(bad)


def _leaf_keys() -> list[str]:
    keys = []
    for section in dataclasses.fields(Config):
        default = getattr(Config(), section.name)
        if dataclasses.is_dataclass(default):
            keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(default)]
        else:
            keys.append(section.name)
    return keys


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-5, 50), max_size=3),
    st.lists(st.lists(st.floats(-1, 2), max_size=3), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_leaf_keys()), _values), max_size=4))
def test_any_combination_is_valid_or_a_clean_config_error(pairs):
    data = Config().to_dict()
    for key, value in pairs:
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        cfg = config_from_dict(data)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message
        assert ":" in message
    else:
        assert isinstance(cfg, Config)


@pytest.mark.parametrize("name", [n for n, s in OPTIMIZERS.items() if not s.shardable])
def test_optimizers_that_need_whole_tensors_are_refused_under_fsdp(name: str) -> None:
    lr = "1.0" if OPTIMIZERS[name].lr_free else "0.001"
    load_config("default", [f"optimizer.name={name}", f"optimizer.lr={lr}"])  # fine unsharded
    with pytest.raises(ConfigError, match=rf"^optimizer\.name: '{name}' needs whole tensors"):
        load_config(
            "default", [f"optimizer.name={name}", f"optimizer.lr={lr}", "train.distributed=fsdp"]
        )


def test_the_shardable_optimizers_include_the_ones_fsdp_tests_run() -> None:
    assert {"adamw", "muon", "adafactor", "sgd"} <= {
        n for n, s in OPTIMIZERS.items() if s.shardable
    }


@pytest.mark.parametrize("name", [n for n, s in OPTIMIZERS.items() if s.lr_free])
def test_a_learning_rate_free_optimizer_refuses_an_lr_meant_for_adam(name: str) -> None:
    load_config("default", [f"optimizer.name={name}", "optimizer.lr=1.0"])
    with pytest.raises(ConfigError, match=r"^optimizer\.lr: .*multiplies that estimate.*=1\.0$"):
        load_config("default", [f"optimizer.name={name}", "optimizer.lr=0.003"])


@pytest.mark.parametrize("name", [n for n, s in OPTIMIZERS.items() if s.lr_free])
def test_a_learning_rate_free_optimizer_has_no_lr_to_range_test(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^optimizer\.lr: auto runs the LR range test, but"):
        load_config("default", [f"optimizer.name={name}", "optimizer.lr=auto"])
