"""The workload protocol: what the trainer needs from anything it trains.

A workload is a model plus indexed access to training samples, the loss as a *sum over units*
(tokens for text, samples otherwise), and an evaluation that returns named metrics, one of which
(`metric`, with its direction) is what ``train.target``, early stopping and ``compare`` read.
Exposing the loss as a sum lets the trainer divide by the unit count of the whole global batch,
so gradient accumulation and any number of processes give the gradient of one large batch.

cadence owns the sample order: the trainer asks for the samples at given indices
(``batch(indices)``), in an order that is a pure function of (seed, sample count), so runs
resume exactly and do not depend on the number of processes, for a user's dataset too.

The built-in workloads and :class:`cadence.DatasetWorkload` (a user's module and datasets)
implement this same protocol; a workload may also be written from scratch by subclassing
:class:`Workload`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cadence.data import EpochSampler

if TYPE_CHECKING:
    from cadence.runtime.distributed import World


class ModelKind(str, enum.Enum):
    """What a trained model does, which decides how it is served and exported.

    Each workload declares one (``WorkloadSpec.kind``); :mod:`cadence.deploy.kinds` maps each
    to the module that serves and exports that kind, so adding a kind is one value here, one
    module there and one registry line.
    """

    LM = "lm"  # text in, next-token logits out: generation, scoring, chat
    CLASSIFIER = "classifier"  # an example in, class probabilities out
    ASR = "asr"  # audio in, text out (CTC log-probabilities per frame)

    @property
    def noun(self) -> str:
        """How messages name the kind: "the mnist classifier", "the lm language model"."""
        return _NOUNS[self]

    @property
    def tokenized(self) -> bool:
        """Whether its inputs are token ids, so a run of it saves and loads a tokenizer."""
        return self is ModelKind.LM


_NOUNS = {
    ModelKind.LM: "language model",
    ModelKind.CLASSIFIER: "classifier",
    ModelKind.ASR: "speech recogniser",
}


class Workload:
    """Override `n_train`, `batch`, `loss_sum` and `evaluate`; the rest has defaults."""

    name: str = ""  # shown in summaries and run-directory names
    metric: str = "val_loss"  # the validation metric `train.target` and early stopping read
    higher_is_better: bool = False  # the metric's direction
    target: float | None = None  # a default for `train.target` (null in the config)
    unit: str = "samples"  # what the loss is averaged over
    tokens_per_sample: int = 0  # > 0 for text: each sample is a sequence of this many tokens
    model: nn.Module
    n_val: int = 0  # validation examples scored per evaluation (see `limit_eval`)

    def __init__(self) -> None:
        self.extras: dict[str, object] = {}  # e.g. the tokenizer, saved into the run directory

    @property
    def n_train(self) -> int:
        """How many training samples there are; indices run over ``range(n_train)``."""
        raise NotImplementedError

    @property
    def val_size(self) -> int:
        """How many validation examples there are in all."""
        raise NotImplementedError

    def limit_eval(self, eval_samples: int | None) -> None:
        """Score at most `eval_samples` validation examples per evaluation (None: all)."""
        total = self.val_size
        self.n_val = total if eval_samples is None else min(eval_samples, total)

    def sampler(self, seed: int, shuffle: bool = True) -> Any:
        """What turns a data position into sample indices: ``.indices(start, count)``.

        By default an :class:`~cadence.data.EpochSampler` (seeded epochs of ``range(n_train)``);
        a workload that addresses its samples otherwise (random window offsets into a token
        stream) returns its own, with the same purity: a function of (seed, position).
        """
        return EpochSampler(self.n_train, seed, shuffle=shuffle)

    # Whether reading a batch costs host time worth overlapping with the step (data read from
    # disk); batches indexed out of tensors already on the device do not.
    prefetch: bool = False

    def batch(self, indices: Tensor) -> Any:
        """The micro-batch of the training samples at `indices` (a CPU int64 tensor, possibly
        empty: under torch.distributed a rank with a smaller share runs an empty micro-batch)."""
        raise NotImplementedError

    def units(self, batch: Any) -> int:
        """How many loss terms a micro-batch holds; known without a device sync."""
        return batch[0].shape[0]

    def batch_units(self, indices: Tensor) -> int | None:
        """The loss terms of the training samples at `indices` where they differ per sample (a
        loss on the answers of a conversation counts only their tokens); None where every
        sample holds ``max(1, tokens_per_sample)``. The trainer divides each global batch's
        loss by this count, which every rank computes alike from the global batch's indices."""
        return None

    def loss_sum(self, model: nn.Module, batch: Any) -> Tensor:
        """The *sum* of the loss over the micro-batch's units (0 for an empty micro-batch)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, world: World | None = None) -> dict[str, float]:
        """Validation metrics on the first `n_val` examples, including `metric`; under
        torch.distributed each rank scores its share and the sums are all-reduced, so every
        rank returns the same numbers."""
        raise NotImplementedError


def val_ranges(n_val: int, size: int, world: World | None) -> Iterator[tuple[int, int]]:
    """This process's share of ``range(n_val)`` as ``[a, b)`` ranges of at most `size`.

    Under torch.distributed each rank takes a contiguous share and every rank yields the same
    number of ranges (the last ones possibly empty): an FSDP2 forward is a collective, so a
    rank that ran one forward fewer would leave the others waiting.
    """
    rank, n = (world.rank, world.size) if world is not None else (0, 1)
    share = torch.tensor_split(torch.arange(n_val), n)[rank]
    lo, hi = (int(share[0]), int(share[-1]) + 1) if len(share) else (0, 0)
    longest = -(-n_val // n)
    for i in range(0, max(longest, 1), size):
        yield min(lo + i, hi), min(lo + i + size, hi)
