"""Model zoo: the workloads the training strategies are exercised on."""

from cadence.models.cnn import SmallCNN
from cadence.models.gpt import GPT, GPTConfig
from cadence.models.linear import LogisticRegression
from cadence.models.mlp import MLP

__all__ = ["GPT", "MLP", "GPTConfig", "LogisticRegression", "SmallCNN"]
