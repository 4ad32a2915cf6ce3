"""Rebuild a trained model from a run (or export) directory, with errors people can act on.

Export, generation and serving all start here, so a missing file, a corrupt weights file or a
config that no longer validates fails the same way everywhere: a ``ConfigError`` whose one-line
message names the path and what would fix it (the CLI prints it and exits 2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cadence.config import Config, ConfigError, parse_config
from cadence.config.schema import PeftConfig
from cadence.workloads import WORKLOADS, ModelKind, check_config

__all__ = ["LoadedRun", "checkpoint_weights", "load_run"]


@dataclass
class LoadedRun:
    """A model in eval mode plus what is needed to feed it."""

    path: Path
    config: Config
    model: nn.Module
    tokenizer: object | None  # cadence.data.tokenizers.Tokenizer for lm runs
    weights: Path  # the safetensors file, or the checkpoint folder the weights came from
    labels: list[str] | None = None  # a classifier's class names (labels.json), if it has them

    @property
    def kind(self) -> ModelKind:
        """What the model does, as its workload declares it; it decides how it is served."""
        return WORKLOADS[self.config.workload].kind

    @property
    def what(self) -> str:
        """How errors name the model: "the lm language model", "the mnist classifier"."""
        return f"the {self.config.workload} {self.kind.noun}"

    @property
    def seq_len(self) -> int:
        """The context a prompt must fit: the model's own (an HF model's may exceed the
        window it was trained on), or model.seq_len."""
        return int(getattr(self.model, "context_length", self.config.model.seq_len))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def weights_file(run_dir: Path, ema: bool, lawa: bool = False) -> Path:
    name = "model_ema" if ema else "model_lawa" if lawa else "model"
    path = run_dir / f"{name}.safetensors"
    if path.is_file():
        return path
    if ema or lawa:
        flag = "ema" if ema else "lawa"
        raise ConfigError(
            f"{path}: not found; --{flag} needs a run trained with train.{flag} set "
            f"(or drop --{flag})"
        )
    hint = ""
    if list((run_dir / "checkpoints").glob("step_*")):
        hint = "; use one of its checkpoints with --checkpoint latest"
    raise ConfigError(f"{path}: not found; the run did not finish{hint}")


def checkpoint_dir(run_dir: Path, checkpoint: str) -> Path:
    """`latest`, a step number, a `step_N` name or a path -> a verified checkpoint folder."""
    from cadence.training.checkpoint import CheckpointError, latest_valid, verify

    root = run_dir / "checkpoints"
    if checkpoint == "latest":
        path, _ = latest_valid(root)
        if path is None:
            raise ConfigError(f"--checkpoint latest: no valid checkpoint in {root}")
    else:
        path = Path(checkpoint)
        if checkpoint.isdigit():
            path = root / f"step_{int(checkpoint):08d}"
        elif not path.is_dir():
            path = root / checkpoint
        if not path.is_dir():
            raise ConfigError(
                f"--checkpoint {checkpoint}: not found; give latest, a step number or a "
                f"folder under {root}"
            )
    try:
        verify(path)
    except CheckpointError as exc:
        raise ConfigError(f"--checkpoint: {exc}") from None
    return path


def load_weights(model: nn.Module, weights: Path, *, from_checkpoint: bool, ema: bool) -> None:
    """A run's weights into ``model`` (a checkpoint's, or a safetensors file), all of them; a
    file that does not fit is one line naming it (ConfigError), never a traceback."""
    from safetensors.torch import load_model

    try:
        if from_checkpoint:
            model.load_state_dict(checkpoint_weights(model, weights, ema), strict=True)
        else:
            load_model(model, str(weights), strict=True, device="cpu")
    except ConfigError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"{weights}: corrupt or does not match config.yaml ({reason[:200]}); "
            "re-export or retrain the run"
        ) from None


def checkpoint_weights(model: nn.Module, path: Path, ema: bool) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds as one whole state dict for `model`.

    Sharded (FSDP) checkpoints are consolidated here from their DCP shards, on one process;
    whole ones are read from model.safetensors. `ema` overlays the EMA shadow weights.
    """
    from safetensors.torch import load_file

    from cadence.training.checkpoint import load_checkpoint, read_manifest, tied_names
    from cadence.training.sharded import DIRNAME, consolidate

    sharded = read_manifest(path).get("layout") == "sharded"
    if sharded:
        weights = consolidate(path / DIRNAME, "model/")
    else:
        weights = load_file(str(path / "model.safetensors"))
    overlay: dict[str, torch.Tensor] = {}
    if ema:
        if sharded:
            overlay = consolidate(path / DIRNAME, "ema/")
        else:
            overlay = dict(load_checkpoint(path, verified=True).get("ema", {}).get("shadow", {}))
        if not overlay:
            raise ConfigError(f"{path}: holds no EMA weights; drop --ema")
    for names in tied_names(model):
        source = next((n for n in names if n in overlay), None)
        value = (
            overlay[source] if source else next((weights[n] for n in names if n in weights), None)
        )
        if value is not None:
            weights.update({n: value for n in names})
    return weights


def load_run(
    run_dir: str | Path,
    ema: bool = False,
    checkpoint: str | None = None,
    lawa: bool = False,
    merge: bool = True,
) -> LoadedRun:
    """Load ``config.yaml``, the tokenizer (lm) and the weights of a run or export directory.

    A ``model.peft`` run's adapters are merged into its weights unless ``merge`` is False.
    ``checkpoint`` (``latest``, a step or a folder) takes the weights from one of the run's
    checkpoints instead of its final ``model.safetensors``, consolidating sharded ones; ``ema``
    and ``lawa`` take ``model_ema`` / ``model_lawa.safetensors`` (train.ema, train.lawa).
    """
    if lawa and (ema or checkpoint):
        raise ConfigError(
            "--lawa: reads model_lawa.safetensors, the run's final LAWA average; "
            "it does not combine with --ema or --checkpoint"
        )
    from cadence.data import DataError
    from cadence.data.tokenizers import load_tokenizer
    from cadence.models.adapters import has_adapters, merge_adapters
    from cadence.workloads import adapt_model, build_model

    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"{path}: run directory not found; pass a folder `cadence train` wrote")
    cfg_path = path / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{cfg_path}: not found; {path} is not a cadence run directory")
    try:
        cfg = parse_config(cfg_path)
        check_config(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{cfg_path}: {exc}") from None
    tokenizer = None
    spec = WORKLOADS.get(cfg.workload)  # None: a user's workload, refused by build_model
    if spec is not None and spec.kind.tokenized:
        try:
            tokenizer = load_tokenizer(path)
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        except Exception as exc:  # a tokenizer.json that `tokenizers` cannot parse
            raise ConfigError(f"{path / 'tokenizer.json'}: cannot be read ({exc})") from None
    labels = _labels(path)
    weights = checkpoint_dir(path, checkpoint) if checkpoint else weights_file(path, ema, lawa)
    try:
        model = build_model(
            cfg,
            vocab_size=getattr(tokenizer, "vocab_size", None),
            run_dir=path,
            n_classes=len(labels) if labels else None,
        )
        adapt_model(model, cfg)  # a model.peft run's weights hold the adapters beside the base
    except ValueError as exc:
        raise ConfigError(f"{cfg_path}: {exc}") from None
    load_weights(model, weights, from_checkpoint=bool(checkpoint), ema=ema)
    # Adapters are folded into the weights they adapt (peft's merge): what is exported, served
    # and generated from is the plain model, with its own structure and parameter names, and
    # the config says so (an export of it is a plain model). `merge=False` keeps them apart
    # (`export --format peft` writes them alone).
    if merge and has_adapters(model):
        merge_adapters(model)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, peft=PeftConfig()))
    model.eval()
    return LoadedRun(
        path=path, config=cfg, model=model, tokenizer=tokenizer, weights=weights, labels=labels
    )


def _labels(path: Path) -> list[str] | None:
    """The class names a speech run trained on: its head's size comes from how many there are."""
    import json

    file = path / "labels.json"
    if not file.is_file():
        return None
    try:
        labels = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file}: cannot be read ({exc}); re-export or retrain the run") from None
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
        raise ConfigError(f"{file}: must be a non-empty JSON list of class names")
    return labels
