"""``workload: asr``: spoken digit strings transcribed by a small CTC recogniser; metric val_cer.

Clips are two seconds of int16 on the device (`cadence.data.digit_strings`), widened per batch
like the command set's; targets are the transcripts' character ids padded with the CTC blank
(id 0, which no transcript contains, so a target's length is its count of non-zero ids). Every
clip has the same length, so every output frame is a valid CTC input frame.

The loss is torch's CTC negative log-likelihood per utterance divided by its transcript length
(torch's ``reduction="mean"``, per-character nats), averaged over utterances; validation
decodes greedily and reports the corpus-level character error rate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cadence.data.digit_strings import MAX_DIGITS, load_digit_strings
from cadence.models.asr import SpeechCTC, decode_ids, edit_distance, encode, greedy_decode
from cadence.runtime.distributed import all_reduce_sums
from cadence.workloads.tensors import TensorWorkload

if TYPE_CHECKING:
    from cadence.config import Config
    from cadence.runtime.distributed import World

__all__ = ["AsrWorkload", "asr_model", "build_asr", "encode_targets"]


def encode_targets(texts: list[str], width: int) -> Tensor:
    """(N, width) int64 character ids, padded with the blank (0)."""
    out = torch.zeros((len(texts), width), dtype=torch.int64)
    for i, text in enumerate(texts):
        ids = encode(text)
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


def _ctc_per_char(log_probs: Tensor, targets: Tensor) -> Tensor:
    """Per-utterance CTC loss / transcript length, (B,); zero_infinity for an unalignable
    (too fast) utterance, whose gradient would otherwise be NaN."""
    lengths = (targets > 0).sum(1)
    frames = torch.full((log_probs.shape[0],), log_probs.shape[1], dtype=torch.int64)
    nll = F.ctc_loss(
        log_probs.float().transpose(0, 1),
        targets,
        frames.to(log_probs.device),
        lengths,
        blank=0,
        reduction="none",
        zero_infinity=True,
    )
    return nll / lengths.clamp(min=1)


class AsrWorkload(TensorWorkload):
    """int16 clips and padded transcripts; CTC loss, greedy decoding, character error rate."""

    metric = "val_cer"
    higher_is_better = False

    def inputs(self, x: Tensor) -> Tensor:
        return x.float() / 32768.0

    def loss_sum(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        log_probs = model(x)
        if x.shape[0] == 0:  # an empty distributed share: a zero that still has a graph
            return log_probs.sum() * 0.0
        return _ctc_per_char(log_probs, y).sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, world: World | None = None) -> dict[str, float]:
        total, edits, chars, n = 0.0, 0, 0, 0
        for x, y in self._val_batches(size=128, world=world):
            log_probs = model(x)  # even when empty: under FSDP2 a forward is a collective
            if x.shape[0] == 0:
                continue
            total += float(_ctc_per_char(log_probs, y).double().sum())
            frames = torch.full((x.shape[0],), log_probs.shape[1], dtype=torch.int64)
            for hyp, ref in zip(greedy_decode(log_probs, frames), y.tolist()):
                ref = [c for c in ref if c > 0]
                edits += edit_distance(decode_ids(hyp), decode_ids(ref))
                chars += len(ref)
            n += x.shape[0]
        total, edits, chars, n = all_reduce_sums([total, edits, chars, n], world)
        return {"val_loss": total / max(n, 1), "val_cer": edits / max(chars, 1)}


def asr_model(cfg: Config) -> SpeechCTC:
    """The recogniser from the config alone (``model.d_model`` wide, ``model.n_layer`` deep)."""
    m = cfg.model
    return SpeechCTC(dim=m.d_model, layers=m.n_layer, dropout=m.dropout, augment=m.augment)


def build_asr(cfg: Config, device: torch.device, tokenizer_dir=None) -> AsrWorkload:
    data = load_digit_strings(cfg.train.seed, cfg.data.voices)
    model = asr_model(cfg)
    return AsrWorkload(
        model.to(device),
        torch.from_numpy(data.x_train).to(device),
        encode_targets(data.text_train, MAX_DIGITS).to(device),
        torch.from_numpy(data.x_val).to(device),
        encode_targets(data.text_val, MAX_DIGITS).to(device),
        eval_samples=cfg.train.eval_samples,
    )
