"""cadence: train PyTorch models with principled strategies and optimizers, and ship the result.

The public API: `load_config` builds a validated config from a recipe or YAML file plus
`KEY=VALUE` overrides; `train` runs it and returns the summary. (The trainer's code lives in
`cadence.training`, so that `cadence.train` can be the function the contract names.)
"""

from cadence.config import Config, ConfigError, load_config
from cadence.training.run import train

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "__version__", "load_config", "train"]
