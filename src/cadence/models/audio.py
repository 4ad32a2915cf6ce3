"""Keyword-spotting style audio classification: log-mel features, SpecAugment and a small CNN.

The features are computed inside the model so that an exported ONNX graph takes raw 16 kHz
audio, exactly as the training loop fed it: there is no separate front end to drift out of sync.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "LogMel",
    "SpecAugment",
    "SpeechCNN",
    "hz_to_mel",
    "mel_filterbank",
    "mel_to_hz",
    "normalise_utterance",
]


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """The HTK mel scale: one formula, invertible in closed form (unlike Slaney's piecewise one)."""
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    """The inverse of `hz_to_mel`, for placing filter corners back on the FFT frequency axis."""
    return 700.0 * (torch.pow(10.0, mel / 2595.0) - 1.0)


def mel_filterbank(
    n_fft: int, n_mels: int, sample_rate: int, f_min: float = 20.0, f_max: float | None = None
) -> torch.Tensor:
    """Triangular filters (n_mels, n_fft // 2 + 1), equally spaced in mel, each scaled to unit area.

    The area (Slaney) normalisation, 2 / (f_hi - f_lo), keeps the wide high-frequency filters from
    dominating the feature scale just because they sum more FFT bins; with the HTK scale this is
    librosa's ``mel(..., htk=True, norm="slaney")``. Built in float64 so the corners are exact
    before the single cast to float32.
    """
    f_max = sample_rate / 2.0 if f_max is None else float(f_max)
    if n_mels < 1 or n_fft < 2 or not 0.0 <= f_min < f_max <= sample_rate / 2.0:
        raise ValueError(
            f"mel_filterbank: need n_mels >= 1, n_fft >= 2 and 0 <= f_min < f_max <= sr/2, got "
            f"n_fft={n_fft}, n_mels={n_mels}, sample_rate={sample_rate}, f_min={f_min}, "
            f"f_max={f_max}"
        )
    f64 = torch.float64
    freqs = torch.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1, dtype=f64)
    edges_mel = torch.linspace(
        hz_to_mel(torch.tensor(f_min, dtype=f64)).item(),
        hz_to_mel(torch.tensor(f_max, dtype=f64)).item(),
        n_mels + 2,
        dtype=f64,
    )
    edges = mel_to_hz(edges_mel)  # lo, centre, hi of filter i are edges[i], edges[i+1], edges[i+2]
    lo, centre, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - lo) / (centre - lo)
    falling = (hi - freqs) / (hi - centre)
    tri = torch.minimum(rising, falling).clamp(min=0.0)
    return (tri * (2.0 / (hi - lo))).to(torch.float32)


def normalise_utterance(mel: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance over (mel, time) per utterance: removes the recording's gain.

    Over all bins together, not per bin: per-bin statistics would erase the stationary
    spectral shape a vowel (or a tone, or the colour of the noise) is recognised by.
    sqrt(var + eps) rather than std + eps keeps a constant input finite and smooth.
    """
    mean = mel.mean(dim=(-2, -1), keepdim=True)
    var = (mel - mean).pow(2).mean(dim=(-2, -1), keepdim=True)
    return (mel - mean) / torch.sqrt(var + eps)


class LogMel(nn.Module):
    """Raw audio (B, T) -> log-mel (B, n_mels, 1 + T // hop_length).

    The STFT is plain ``torch.stft``: with ``dynamo=True`` it exports to the ONNX ``STFT`` op (opset
    17+) and onnxruntime matches it to float32 rounding, so no hand-rolled conv1d DFT is needed.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 512,
        win_length: int = 400,
        hop_length: int = 160,
        n_mels: int = 40,
        f_min: float = 20.0,
        f_max: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not 0 < win_length <= n_fft or hop_length < 1:
            raise ValueError(
                f"LogMel: need 0 < win_length <= n_fft and hop_length >= 1, got "
                f"win_length={win_length}, n_fft={n_fft}, hop_length={hop_length}"
            )
        self.sample_rate, self.n_fft, self.n_mels = sample_rate, n_fft, n_mels
        self.win_length, self.hop_length, self.eps = win_length, hop_length, eps
        # Non-persistent: both are pure functions of the config, so a checkpoint never carries a
        # stale copy, and old checkpoints load after a change to how they are built.
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        self.register_buffer(
            "filterbank", mel_filterbank(n_fft, n_mels, sample_rate, f_min, f_max), persistent=False
        )

    def power_spectrum(self, audio: torch.Tensor) -> torch.Tensor:
        """|STFT|^2 (B, n_fft // 2 + 1, frames), public so it can be checked against a reference."""
        if audio.dim() != 2:
            raise ValueError(f"LogMel: expected audio of shape (B, T), got {tuple(audio.shape)}")
        if audio.shape[0] == 0:  # an empty distributed share; torch.stft's padding refuses it
            frames = 1 + audio.shape[1] // self.hop_length
            return audio.new_zeros((0, self.n_fft // 2 + 1, frames), dtype=torch.float32)
        spec = torch.stft(
            audio.float(),
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        # re^2 + im^2 rather than abs()**2: no square root to round, and none to differentiate at 0.
        # Added as two slices, not .sum(-1): the same floats (a sum of two terms is one rounding
        # either way), but a reduction over a last dim of 2 took 2-3 ms of a 3 ms step here.
        squares = torch.view_as_real(spec).pow(2)
        return squares[..., 0] + squares[..., 1]

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """The additive eps bounds log(0) for digital silence at a floor far below any speech."""
        # float32 even under bf16 autocast: bf16's 8-bit mantissa would quantise the energies
        # that the log then magnifies, and the front end is a negligible share of the compute.
        with torch.autocast(device_type=audio.device.type, enabled=False):
            mel = torch.matmul(self.filterbank, self.power_spectrum(audio))
            return torch.log(mel + self.eps)


class SpecAugment(nn.Module):
    """Frequency and time masking on (B, F, T) features; identity outside training.

    Masks are filled with each example's mean rather than zero: log-mel values are mostly
    negative, so a zero band would be the loudest thing in the utterance, not an absence.
    """

    def __init__(
        self, freq_masks: int = 2, freq_width: int = 8, time_masks: int = 2, time_width: int = 10
    ) -> None:
        super().__init__()
        if min(freq_masks, freq_width, time_masks, time_width) < 0:
            raise ValueError("SpecAugment: mask counts and widths must be >= 0")
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width = time_masks, time_width

    @staticmethod
    def _bands(batch: int, n_masks: int, max_width: int, size: int) -> torch.Tensor:
        """(B, size) bool: the union of n_masks bands per example, each of width U{0..max_width}.

        Drawn from the global CPU generator, so a given seed masks the same bins on every device
        and the trainer's checkpointed RNG state replays them exactly on resume.
        """
        width = torch.randint(0, max_width + 1, (batch, n_masks)).clamp(max=size)
        start = (torch.rand(batch, n_masks) * (size - width + 1)).long()
        start = torch.minimum(start, size - width)  # guard float rounding of rand() * n up to n
        idx = torch.arange(size)
        inside = (idx >= start[..., None]) & (idx < (start + width)[..., None])
        return inside.any(dim=1)

    def draw_masks(self, batch: int, n_freq: int, n_time: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n_freq) and (B, n_time) bool masks; public so the width rule can be tested alone."""
        freq = self._bands(batch, self.freq_masks, self.freq_width, n_freq)
        time = self._bands(batch, self.time_masks, self.time_width, n_time)
        return freq, time

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return features
        batch, n_freq, n_time = features.shape
        freq, time = self.draw_masks(batch, n_freq, n_time)
        masked = freq.to(features.device)[:, :, None] | time.to(features.device)[:, None, :]
        mean = features.mean(dim=(1, 2), keepdim=True)
        return torch.where(masked, mean, features)


class SpeechCNN(nn.Module):
    """Raw 16 kHz audio (B, T) -> logits (B, n_classes), front end included.

    Per-utterance normalisation (the log-mel to zero mean and unit variance over all bins and
    frames) removes the recording's gain before the CNN sees it. Not per bin: normalising each
    mel bin over time would also erase the stationary spectral shape (a held vowel, a tone,
    the colour of background noise), which is what some classes are told apart by. Pooling
    averages over time only (any length T works) and keeps the frequency axis: a 3x3 CNN
    pooled over frequency too would see a 300 Hz and a 1,200 Hz tone as the same pattern.

    GroupNorm, not BatchNorm: each example's output then depends on that example alone, so
    gradient accumulation (batch.micro_size) and DDP over N processes compute exactly the
    single-process full-batch step, as they do for every other cadence model; BatchNorm's
    statistics would change with the micro-batch, and SyncBatchNorm does not run on CPU.
    """

    def __init__(
        self,
        n_classes: int,
        n_mels: int = 40,
        channels: tuple[int, ...] = (32, 64, 128),
        dropout: float = 0.1,
        augment: bool = True,
    ) -> None:
        super().__init__()
        if n_classes < 1 or not channels or min(channels) < 1:
            raise ValueError(
                f"SpeechCNN: need n_classes >= 1 and positive channels, got n_classes={n_classes}, "
                f"channels={channels}"
            )
        if n_mels < 2 ** (len(channels) - 1):
            raise ValueError(
                f"SpeechCNN: {len(channels) - 1} max-pools halve the {n_mels} mel bins below one; "
                f"use n_mels >= {2 ** (len(channels) - 1)} or fewer blocks"
            )
        self.features = LogMel(n_mels=n_mels)
        self.augment = SpecAugment() if augment else nn.Identity()
        self.norm_eps = 1e-5
        layers: list[nn.Module] = []
        in_ch = 1
        for i, ch in enumerate(channels):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [
                nn.Conv2d(in_ch, ch, kernel_size=3, padding=1, bias=False),  # the norm's bias
                nn.GroupNorm(min(8, ch), ch),
                nn.ReLU(),
            ]
            in_ch = ch
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(in_ch * (n_mels // 2 ** (len(channels) - 1)), n_classes)

    def normalise(self, mel: torch.Tensor) -> torch.Tensor:
        return normalise_utterance(mel, self.norm_eps)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.augment(self.normalise(self.features(audio)))
        x = self.body(x.unsqueeze(1)).mean(dim=3).flatten(1)  # (B, C * F'): time pooled
        return self.head(self.dropout(x))

    def output_parameter_names(self) -> set[str]:
        """The classifier layer, which hidden-matrix optimizers (Muon) should not own."""
        return {"head.weight", "head.bias"}

    def num_params(self) -> int:
        """Trainable parameters; the window and filterbank are buffers and do not count."""
        return sum(p.numel() for p in self.parameters())
