"""Datasets, tokenizers and the resumable sampler; all local, no downloads."""

from cadence.data.errors import DataError
from cadence.data.sampler import EpochSampler, RandomOffsets
from cadence.data.tabular import (
    load_breast_cancer_split,
    logreg_grad,
    logreg_loss,
    logreg_optimum,
)
from cadence.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    PretrainedTokenizer,
    Tokenizer,
    build_tokenizer,
    has_pretrained_tokenizer,
    load_tokenizer,
)
from cadence.data.vision import load_digits, load_mnist, split_indices

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "DataError",
    "EpochSampler",
    "PretrainedTokenizer",
    "RandomOffsets",
    "Tokenizer",
    "build_tokenizer",
    "load_breast_cancer_split",
    "load_digits",
    "load_mnist",
    "has_pretrained_tokenizer",
    "load_tokenizer",
    "logreg_grad",
    "logreg_loss",
    "logreg_optimum",
    "split_indices",
]
