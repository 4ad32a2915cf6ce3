"""Typed, documented configuration: YAML recipes + ``--set`` overrides -> a validated ``Config``.

Every field has a default and a one-line comment (schema.py). A bad value is rejected when the
config is built, with a ``ConfigError`` whose one-line message names the dotted key and what is
allowed, so the CLI can print it and exit 2 before anything is written to disk. This package
checks the config's own rules and its builders' (loading.py, validate.py); the workload's rules
are checked one layer up (``cadence.workloads.check_config``), and ``cadence.load_config`` runs
both.
"""

from cadence.config.loading import (
    config_from_dict,
    dump_config,
    flatten,
    parse_config,
    parse_override,
    read_source,
    recipe_description,
    recipe_names,
    yaml_load,
)
from cadence.config.schema import (
    BatchConfig,
    Config,
    ConfigError,
    ConfigWarning,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    PlateauConfig,
    PrivacyConfig,
    ScheduleConfig,
    TrainConfig,
)
from cadence.config.validate import validate

__all__ = [
    "BatchConfig",
    "Config",
    "ConfigError",
    "ConfigWarning",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PlateauConfig",
    "PrivacyConfig",
    "ScheduleConfig",
    "TrainConfig",
    "config_from_dict",
    "dump_config",
    "flatten",
    "parse_config",
    "parse_override",
    "read_source",
    "recipe_description",
    "recipe_names",
    "validate",
    "yaml_load",
]
