"""A small CTC recogniser for spoken digit strings: raw 16 kHz audio in, per-frame log-probs out.

The front end (log-mel, per-utterance normalisation, SpecAugment) is the keyword model's
(`cadence.models.audio`), inside the module for the same reason: an exported ONNX graph takes
raw audio exactly as training fed it. Around it sit the pieces CTC training and scoring need:
the alphabet, the loss, greedy decoding and the character error rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cadence.models.audio import LogMel, SpecAugment, normalise_utterance

__all__ = [
    "ALPHABET",
    "BLANK",
    "SpeechCTC",
    "cer",
    "ctc_loss",
    "decode_ids",
    "edit_distance",
    "encode",
    "greedy_decode",
]

ALPHABET = "0123456789"
BLANK = 0  # CTC blank; character ALPHABET[i] is id i + 1, so no transcript can contain a blank
_IDS = {ch: i + 1 for i, ch in enumerate(ALPHABET)}


def encode(text: str) -> list[int]:
    """Character ids (1..len(ALPHABET)); strict, so a stray space or letter in a transcript is
    a loud error at data preparation rather than a silently untrainable target."""
    try:
        return [_IDS[ch] for ch in text]
    except KeyError as err:
        raise ValueError(
            f"encode: character {err.args[0]!r} in {text!r} is not in the alphabet {ALPHABET!r}"
        ) from None


def decode_ids(ids: Sequence[int] | Tensor) -> str:
    """The inverse of `encode`. Blanks are skipped, so a blank-padded target row decodes as is;
    any other id outside the alphabet is an error (a head of the wrong width, say)."""
    values = ids.tolist() if isinstance(ids, Tensor) else ids
    out = []
    for i in values:
        i = int(i)
        if i == BLANK:
            continue
        if not 1 <= i <= len(ALPHABET):
            raise ValueError(f"decode_ids: id {i} is outside 0..{len(ALPHABET)}")
        out.append(ALPHABET[i - 1])
    return "".join(out)


class _ConvBlock(nn.Module):
    """x + FFN(LayerNorm(depthwise_conv(x))) on (B, T, C): a 1-D ConvNeXt block.

    A depthwise conv mixes time per channel (cheap: C * k weights), the pointwise FFN mixes
    channels per frame. LayerNorm, not BatchNorm, so each clip's output depends on that clip
    alone and micro-batching or DDP compute the single-process full-batch step (as `SpeechCNN`
    does with GroupNorm).
    """

    def __init__(self, dim: int, kernel_size: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, expansion * dim)
        self.down = nn.Linear(expansion * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x.transpose(1, 2)).transpose(1, 2)
        y = self.down(F.gelu(self.up(self.norm(y))))
        return x + self.dropout(y)


class SpeechCTC(nn.Module):
    """Raw 16 kHz audio (B, T) -> log-probabilities (B, frames, len(ALPHABET) + 1), blank at 0.

    Log-mel (10 ms hop) -> normalise -> SpecAugment (training only) -> a stride-2 conv over
    time (20 ms frames: a spoken digit still spans ~15 of them, and CTC needs at least one
    frame per character plus one between repeats) -> residual depthwise-separable conv blocks
    -> a linear head. Convolutions rather than a Transformer: at dim 144 a pre-norm
    nn.TransformerEncoder of four layers had twice the parameters and took ~2.8x as long per
    training step on one CPU thread (32 clips of 3 s), and the conv stack needs no positional
    encoding. Kernel 9, not larger: one-thread oneDNN depthwise convs got several times slower
    at 15, and four blocks of 9 still see 0.66 s, a digit and its neighbours' edges.
    Odd kernels with k // 2 padding keep the length, so `output_lengths` is the front end's
    count and the one strided conv's formula.
    """

    def __init__(
        self,
        n_mels: int = 40,
        dim: int = 144,
        layers: int = 4,
        kernel_size: int = 9,
        expansion: int = 2,
        dropout: float = 0.1,
        augment: bool = True,
    ) -> None:
        super().__init__()
        if min(n_mels, dim, layers, expansion) < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"SpeechCTC: need positive n_mels, dim, layers, expansion and an odd kernel_size, "
                f"got n_mels={n_mels}, dim={dim}, layers={layers}, expansion={expansion}, "
                f"kernel_size={kernel_size}"
            )
        self.features = LogMel(n_mels=n_mels)
        self.augment = SpecAugment() if augment else nn.Identity()
        self.norm_eps = 1e-5
        self.subsample = nn.Conv1d(n_mels, dim, kernel_size=3, stride=2, padding=1)
        self.blocks = nn.Sequential(
            *(_ConvBlock(dim, kernel_size, expansion, dropout) for _ in range(layers))
        )
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, len(ALPHABET) + 1)

    def forward(self, audio: Tensor) -> Tensor:
        x = self.augment(normalise_utterance(self.features(audio), self.norm_eps))  # (B, F, T)
        x = F.gelu(self.subsample(x)).transpose(1, 2)  # (B, T', dim)
        x = self.norm(self.blocks(x))
        # float32 log-softmax even under bf16 autocast: CTC sums these over every alignment.
        return self.head(self.dropout(x)).float().log_softmax(dim=-1)

    def output_lengths(self, input_samples: Tensor) -> Tensor:
        """Output frames per clip length in samples (int64), for CTC on zero-padded batches.

        Read off the modules' own hop, kernel, stride and padding so a change to either cannot
        leave the formula behind. The STFT is centred (reflect padding), hence 1 + T // hop.
        """
        samples = torch.as_tensor(input_samples, dtype=torch.int64)
        frames = 1 + torch.div(samples, self.features.hop_length, rounding_mode="floor")
        conv = self.subsample
        span = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
        return (
            torch.div(frames + 2 * conv.padding[0] - span, conv.stride[0], rounding_mode="floor")
            + 1
        )

    def output_parameter_names(self) -> set[str]:
        """The vocabulary projection, which hidden-matrix optimizers (Muon) should not own."""
        return {"head.weight", "head.bias"}

    def num_params(self) -> int:
        """Trainable parameters; the window and filterbank are buffers and do not count."""
        return sum(p.numel() for p in self.parameters())


def ctc_loss(
    log_probs: Tensor,
    targets: Tensor | Sequence[Sequence[int]],
    input_lengths: Tensor | None = None,
    target_lengths: Tensor | None = None,
) -> Tensor:
    """Mean CTC loss (per target character, then over the batch) of (B, T', C) log-probs.

    `targets` is a list of id lists or a (B, S) tensor padded with the blank; a padded tensor's
    lengths default to its non-blank counts (no transcript contains a blank), and
    `input_lengths` defaults to all T' frames. torch wants time first, hence the transpose.

    zero_infinity=True: an utterance too long for its frames (fewer than its characters plus
    one per repeated pair) has no alignment, an infinite loss and a NaN gradient that would
    poison the whole step; zeroed, it contributes nothing and the rest of the batch trains.
    """
    batch, frames = log_probs.shape[0], log_probs.shape[1]
    device = log_probs.device
    if not isinstance(targets, Tensor):
        lengths = torch.tensor([len(t) for t in targets], dtype=torch.int64)
        padded = torch.full((len(targets), max(lengths.tolist(), default=0)), BLANK)
        for i, t in enumerate(targets):
            padded[i, : len(t)] = torch.as_tensor(list(t), dtype=torch.int64)
        targets = padded
        if target_lengths is None:
            target_lengths = lengths
    elif target_lengths is None:
        target_lengths = (targets != BLANK).sum(dim=1)
    if input_lengths is None:
        input_lengths = torch.full((batch,), frames, dtype=torch.int64)
    return F.ctc_loss(
        log_probs.float().transpose(0, 1),
        targets.to(device=device, dtype=torch.int64),
        torch.as_tensor(input_lengths, dtype=torch.int64, device=device),
        torch.as_tensor(target_lengths, dtype=torch.int64, device=device),
        blank=BLANK,
        reduction="mean",
        zero_infinity=True,
    )


def greedy_decode(
    log_probs: Tensor, lengths: Tensor | Sequence[int] | None = None
) -> list[list[int]]:
    """Best path per clip: argmax per frame, repeats collapsed, then blanks dropped.

    Collapsing before dropping is what lets a blank separate a doubled character ("1 _ 1" is
    "11", "1 1" is "1"). Frames at or past a clip's length (padding) are ignored.
    """
    best = log_probs.argmax(dim=-1).cpu()  # (B, T')
    batch, frames = best.shape
    if lengths is None:
        lengths = torch.full((batch,), frames, dtype=torch.int64)
    lengths = torch.as_tensor(lengths, dtype=torch.int64).cpu()
    prev = torch.cat([torch.full((batch, 1), -1, dtype=best.dtype), best[:, :-1]], dim=1)
    valid = torch.arange(frames)[None, :] < lengths[:, None]
    keep = (best != prev) & (best != BLANK) & valid
    return [row[mask].tolist() for row, mask in zip(best, keep)]


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (unit substitution, insertion, deletion), by the two-row DP.

    Written here rather than imported: twenty lines do not justify a dependency, and
    strings of a few characters make the O(len(a) * len(b)) loop negligible.
    """
    if len(a) < len(b):
        a, b = b, a  # the shorter one indexes the rows: O(min) memory
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i]
        for j, y in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def cer(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus-level character error rate: total edits / total reference characters.

    The standard definition (as in sclite and jiwer), not a mean of per-utterance rates, which
    would weight a two-digit string like a five-digit one. It can exceed 1 (insertions). With
    no reference characters at all the ratio is undefined; then every hypothesis character is
    an error and there is nothing to divide by, so return 0.0 if all hypotheses are empty and
    1.0 otherwise (a rate, not a count, so it stays comparable with ordinary values).
    """
    if len(hyps) != len(refs):
        raise ValueError(f"cer: {len(hyps)} hypotheses for {len(refs)} references")
    edits = sum(edit_distance(h, r) for h, r in zip(hyps, refs))
    chars = sum(len(r) for r in refs)
    if chars == 0:
        return 0.0 if edits == 0 else 1.0
    return edits / chars
