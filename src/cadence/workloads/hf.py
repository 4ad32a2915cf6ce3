"""Hugging Face causal LMs on the ``lm`` workload: which model, which tokenizer, which rules.

``model.hf: DIR`` loads a local model directory (weights and config, ``local_files_only``);
``model.hf_config: {model_type: ..., ...}`` builds a fresh one from a config. Either way the
model trains on the ``lm`` workload's text, with the directory's own tokenizer when it ships
one (``tokenizer.json``) and ``data.tokenizer`` otherwise. A run directory keeps the model's
config under ``hf/`` so export and serving rebuild it without the original directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cadence.config import Config, ConfigError
from cadence.data import DataError, has_pretrained_tokenizer
from cadence.io import sha256_file
from cadence.models.hf import HFCausalLM, hf_config_from_dict, load_hf_config
from cadence.workloads.device import resolve_device

__all__ = [
    "HF_CONFIG_DIR",
    "build_hf_model",
    "check_hf",
    "check_run_tokenizer",
    "check_prepared_tokenizer",
    "hf_tokenizer_dir",
    "is_hf",
]

HF_CONFIG_DIR = "hf"  # under a run directory: the model's config.json


def is_hf(cfg: Config) -> bool:
    return cfg.model.hf is not None or cfg.model.hf_config is not None


def _key(cfg: Config) -> str:
    """The config key an HF model came from, for error messages."""
    return "model.hf" if cfg.model.hf is not None else "model.hf_config"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _model_dir(cfg: Config) -> Path:
    path = Path(cfg.model.hf).expanduser()  # type: ignore[arg-type]
    if not path.is_dir():
        raise ConfigError(
            f"model.hf: {path} is not a directory; give a folder that save_pretrained wrote"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.hf: {path} has no config.json; give a folder that save_pretrained wrote"
        )
    return path


def _config(cfg: Config, vocab_size: int | None = None, run_dir: Path | None = None) -> Any:
    try:
        if run_dir is not None and (run_dir / HF_CONFIG_DIR / "config.json").is_file():
            return load_hf_config(run_dir / HF_CONFIG_DIR)
        if cfg.model.hf is not None:
            return load_hf_config(_model_dir(cfg))
        return hf_config_from_dict(cfg.model.hf_config or {}, vocab_size)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers' own refusal, as one line
        raise ConfigError(
            f"{_key(cfg)}: transformers cannot build it ({_first_line(exc)})"
        ) from None


def check_hf(cfg: Config) -> None:
    """The model's config loads and its context holds ``model.seq_len`` (no weights read)."""
    config = _config(cfg)
    if cfg.model.hf_config is not None:
        _check_fits(cfg, HFCausalLM.count_parameters(config))
    context = HFCausalLM.context_of(config)
    if cfg.model.seq_len > context:
        raise ConfigError(
            f"model.seq_len: {cfg.model.seq_len} is longer than the model's context of "
            f"{context} positions; lower model.seq_len"
        )


def _check_fits(cfg: Config, params: int) -> None:
    """Refuse a fresh model whose training state cannot fit in this machine's memory.

    A ``model_type`` given without sizes takes transformers' defaults (a 7B Llama); building
    it would be killed by the OOM killer, with no message, minutes later. Weights, gradients
    and two Adam moments in fp32 are 16 bytes per parameter.
    """
    if resolve_device(cfg.train.device).type != "cpu":
        return
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    need = 16 * params
    if need > memory:
        raise ConfigError(
            f"model.hf_config: {params / 1e6:,.0f}M parameters need about {need / 2**30:,.0f} "
            f"GiB to train, more than this machine's {memory / 2**30:,.0f} GiB; give the sizes "
            "(hidden_size, num_hidden_layers, ...) of a smaller model"
        )


def hf_tokenizer_dir(cfg: Config) -> Path | None:
    """The model directory when it has its own tokenizer (the data is tokenized with it)."""
    if cfg.model.hf is None:
        return None
    folder = _model_dir(cfg)
    return folder.resolve() if has_pretrained_tokenizer(folder) else None


def check_prepared_tokenizer(cfg: Config, corpus: Path) -> None:
    """A model folder with its own tokenizer trains only on data prepared with that tokenizer:
    the ids of another mean other tokens, and nothing else would notice."""
    # deferred, as everywhere in cadence: a native library that only model.hf runs need
    from tokenizers import Tokenizer

    if cfg.model.hf is None:
        return
    folder = _model_dir(cfg)
    if not has_pretrained_tokenizer(folder):
        return
    ours = Tokenizer.from_file(str(folder / "tokenizer.json")).to_str()
    try:
        theirs = Tokenizer.from_file(str(corpus / "tokenizer.json")).to_str()
    except Exception:  # noqa: BLE001 - cadence's byte tokenizer is not a `tokenizers` file
        theirs = None
    if ours != theirs:
        raise ConfigError(
            f"data.path: {corpus} was prepared with another tokenizer than model.hf's own; "
            f"prepare it with `cadence prepare-data ... --tokenizer {cfg.model.hf}`"
        )


def build_hf_model(cfg: Config, vocab_size: int, run_dir: Path | None = None) -> HFCausalLM:
    """The HF model for a run: pretrained weights from ``model.hf``, a fresh init from
    ``model.hf_config``, or (``run_dir``, for export and serving) the shape the run saved,
    whose weights the caller loads. Refuses a tokenizer larger than the vocabulary."""
    seq_len = cfg.model.seq_len
    config = _config(cfg, vocab_size, run_dir)
    if vocab_size > config.vocab_size:
        raise ConfigError(
            f"{_key(cfg)}: the tokenizer has {vocab_size} tokens but the model's vocabulary has "
            f"{config.vocab_size}; use the model's own tokenizer (tokenizer.json in its folder) "
            "or a smaller data.vocab_size / data.tokenizer=byte"
        )
    try:
        if run_dir is not None or cfg.model.hf is None:
            return HFCausalLM.from_config(config, seq_len)
        return HFCausalLM.from_pretrained(_model_dir(cfg), seq_len)
    except Exception as exc:  # noqa: BLE001 - missing or corrupt weights, as one line
        raise ConfigError(f"model.hf: cannot load the model ({_first_line(exc)})") from None


def check_run_tokenizer(run_dir: Path | None, corpus: Path) -> None:
    """A resumed run must read the token ids it trained on: a prepared corpus (or the cached
    one, re-prepared if the cache was cleared) must carry the run's own tokenizer."""
    if run_dir is None:
        return
    ours, theirs = run_dir / "tokenizer.json", corpus / "tokenizer.json"
    if ours.is_file() and sha256_file(ours) != sha256_file(theirs):
        raise DataError(
            f"data.path: the corpus prepared in {corpus} has another tokenizer than the run in "
            f"{run_dir} trained with (its text or the cache changed); resume with the data "
            "the run started from, or start a new run"
        )
