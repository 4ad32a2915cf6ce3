"""Rebuild a trained model from a run (or export) directory, with errors people can act on.

Export, generation and serving all start here, so a missing file, a corrupt weights file or a
config that no longer validates fails the same way everywhere: a ``ConfigError`` whose one-line
message names the path and what would fix it (the CLI prints it and exits 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cadence.config import Config, ConfigError, load_config

__all__ = ["CLASSIFIER_INPUTS", "LoadedRun", "load_run"]

# Per-example input shape each classifier workload's model expects (a flat list is accepted too).
CLASSIFIER_INPUTS: dict[str, tuple[int, ...]] = {
    "mnist": (1, 28, 28),
    "digits": (64,),
    "logreg": (30,),
}


@dataclass
class LoadedRun:
    """A model in eval mode plus what is needed to feed it."""

    path: Path
    config: Config
    model: nn.Module
    tokenizer: object | None  # cadence.data.tokenizers.Tokenizer for lm runs
    weights: Path

    @property
    def kind(self) -> str:
        """``lm`` (text generation) or ``classifier`` (class probabilities)."""
        return "lm" if self.config.workload == "lm" else "classifier"

    @property
    def seq_len(self) -> int:
        return self.config.model.seq_len

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _weights_file(run_dir: Path, ema: bool) -> Path:
    name = "model_ema.safetensors" if ema else "model.safetensors"
    path = run_dir / name
    if path.is_file():
        return path
    if ema:
        raise ConfigError(
            f"{path}: not found; --ema needs a run trained with train.ema set (or drop --ema)"
        )
    ckpts = sorted((run_dir / "checkpoints").glob("step_*/model.safetensors"))
    hint = f" (latest checkpoint: {ckpts[-1]})" if ckpts else ""
    raise ConfigError(f"{path}: not found; the run did not finish{hint}")


def load_run(run_dir: str | Path, ema: bool = False) -> LoadedRun:
    """Load ``config.yaml``, the tokenizer (lm) and the weights of a run or export directory."""
    from safetensors.torch import load_model

    from cadence.data import DataError
    from cadence.data.tokenizers import load_tokenizer
    from cadence.workloads import build_model

    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"{path}: run directory not found; pass a folder `cadence train` wrote")
    cfg_path = path / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{cfg_path}: not found; {path} is not a cadence run directory")
    try:
        cfg = load_config(cfg_path)
    except ConfigError as exc:
        raise ConfigError(f"{cfg_path}: {exc}") from None
    tokenizer = None
    if cfg.workload == "lm":
        try:
            tokenizer = load_tokenizer(path)
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        except Exception as exc:  # a tokenizer.json that `tokenizers` cannot parse
            raise ConfigError(f"{path / 'tokenizer.json'}: cannot be read ({exc})") from None
    weights = _weights_file(path, ema)
    try:
        model = build_model(cfg, vocab_size=getattr(tokenizer, "vocab_size", None))
    except ValueError as exc:
        raise ConfigError(f"{cfg_path}: {exc}") from None
    try:
        load_model(model, str(weights), strict=True, device="cpu")
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"{weights}: corrupt or does not match config.yaml ({reason[:200]}); "
            "re-export or retrain the run"
        ) from None
    model.eval()
    return LoadedRun(path=path, config=cfg, model=model, tokenizer=tokenizer, weights=weights)
