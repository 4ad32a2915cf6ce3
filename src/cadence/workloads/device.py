"""``train.device`` -> a torch device.

Its own module because the model checks (hf.py) and the builders (resolve.py) both need it, and
resolve.py sits above the registry that hf.py is part of.
"""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
