"""The audio front end (mel filterbank, log-mel STFT, SpecAugment) and the SpeechCNN on top.

References are independent numpy implementations written here; expected numbers are derived
from the configuration (sample rate, hop, mel edges), never pasted in.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cadence.models.audio import LogMel, SpecAugment, SpeechCNN, mel_filterbank

SR, N_FFT, WIN, HOP, N_MELS, F_MIN = 16000, 512, 400, 160, 40, 20.0


# --- independent numpy references ---------------------------------------------------------


def np_hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def np_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def np_mel_edges(n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """n_mels + 2 corner frequencies, equally spaced on the HTK mel scale."""
    return np_mel_to_hz(np.linspace(np_hz_to_mel(f_min), np_hz_to_mel(f_max), n_mels + 2))


def np_filterbank(n_fft: int, n_mels: int, sr: int, f_min: float, f_max: float) -> np.ndarray:
    """Each filter by piecewise-linear interpolation through (lo, 0), (centre, 1), (hi, 0)."""
    freqs = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)
    edges = np_mel_edges(n_mels, f_min, f_max)
    out = np.zeros((n_mels, freqs.size))
    for i in range(n_mels):
        lo, c, hi = edges[i : i + 3]
        out[i] = np.interp(freqs, [lo, c, hi], [0.0, 1.0, 0.0], left=0.0, right=0.0)
        out[i] *= 2.0 / (hi - lo)
    return out


def np_power_spectrum(audio: np.ndarray, n_fft: int, win: int, hop: int) -> np.ndarray:
    """Reflect-pad by n_fft // 2, cut frames, apply a periodic Hann centred in n_fft, rfft."""
    n = np.arange(win)
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win)
    window = np.zeros(n_fft)
    left = (n_fft - win) // 2
    window[left : left + win] = hann
    padded = np.pad(audio.astype(np.float64), [(0, 0), (n_fft // 2, n_fft // 2)], mode="reflect")
    n_frames = 1 + (padded.shape[1] - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
    frames = padded[:, idx] * window  # (B, frames, n_fft)
    return (np.abs(np.fft.rfft(frames, axis=-1)) ** 2).transpose(0, 2, 1)


def sine(freq: float, num_samples: int, sr: int = SR) -> torch.Tensor:
    t = torch.arange(num_samples, dtype=torch.float64) / sr
    return torch.sin(2.0 * torch.pi * freq * t).float()


# --- mel filterbank -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_fft", "n_mels", "sr", "f_min", "f_max"),
    [(N_FFT, N_MELS, SR, F_MIN, None), (1024, 64, 22050, 0.0, 8000.0), (400, 23, 8000, 50.0, None)],
)
def test_filterbank_matches_numpy_reference(n_fft, n_mels, sr, f_min, f_max) -> None:
    fb = mel_filterbank(n_fft, n_mels, sr, f_min, f_max)
    ref = np_filterbank(n_fft, n_mels, sr, f_min, sr / 2.0 if f_max is None else f_max)
    assert fb.shape == (n_mels, n_fft // 2 + 1)
    assert fb.dtype == torch.float32
    np.testing.assert_allclose(fb.numpy(), ref, rtol=1e-5, atol=1e-7 * ref.max())


def test_filterbank_properties() -> None:
    fb = mel_filterbank(N_FFT, N_MELS, SR, F_MIN).double().numpy()
    freqs = np.linspace(0.0, SR / 2.0, N_FFT // 2 + 1)
    bin_hz = freqs[1] - freqs[0]
    edges = np_mel_edges(N_MELS, F_MIN, SR / 2.0)
    lo, centre, hi = edges[:-2], edges[1:-1], edges[2:]
    assert (fb >= 0).all()
    assert (fb.sum(axis=1) > 0).all(), "no filter may fall between FFT bins and stay empty"
    peaks = fb.argmax(axis=1)
    # The peak is one of the two FFT bins bracketing the centre (the triangle is asymmetric, so
    # the nearer bin need not win), and nothing lies outside (lo, hi).
    assert (np.abs(freqs[peaks] - centre) < bin_hz).all()
    assert (np.diff(peaks) >= 0).all()
    outside = (freqs[None, :] <= lo[:, None]) | (freqs[None, :] >= hi[:, None])
    assert (fb[outside] == 0).all()
    # Slaney area normalisation: the triangle's height is 2 / (hi - lo), so no bin exceeds it.
    assert (fb.max(axis=1) <= 2.0 / (hi - lo) * (1 + 1e-6)).all()


def test_filterbank_peak_at_centre_on_a_fine_grid() -> None:
    """With bins far narrower than the filters, the peak bin is the one nearest the centre."""
    n_fft = 16384
    fb = mel_filterbank(n_fft, N_MELS, SR, F_MIN).numpy()
    freqs = np.linspace(0.0, SR / 2.0, n_fft // 2 + 1)
    centre = np_mel_edges(N_MELS, F_MIN, SR / 2.0)[1:-1]
    nearest = np.abs(freqs[None, :] - centre[:, None]).argmin(axis=1)
    assert (np.abs(fb.argmax(axis=1) - nearest) <= 1).all()


def test_filterbank_rejects_bad_ranges() -> None:
    with pytest.raises(ValueError):
        mel_filterbank(N_FFT, N_MELS, SR, f_min=100.0, f_max=50.0)
    with pytest.raises(ValueError):
        mel_filterbank(N_FFT, N_MELS, SR, f_max=SR)  # above Nyquist


# --- LogMel ---------------------------------------------------------------------------------


def test_logmel_buffers_are_not_in_state_dict() -> None:
    m = LogMel()
    assert m.state_dict() == {}
    assert {name for name, _ in m.named_buffers()} == {"window", "filterbank"}


@pytest.mark.parametrize("num_samples", [SR, SR + 1, SR + HOP - 1, 2 * SR + 7, N_FFT])
def test_logmel_frame_count(num_samples: int) -> None:
    out = LogMel()(torch.randn(2, num_samples))
    assert out.shape == (2, N_MELS, 1 + num_samples // HOP)


def test_logmel_sine_peaks_in_nearest_mel_bin() -> None:
    centres = np_mel_edges(N_MELS, F_MIN, SR / 2.0)[1:-1]
    m = LogMel()
    # Sines at a spread of filter centres, low to high: the energy must land in that filter.
    for k in range(3, N_MELS, N_MELS // 5):
        freq = float(centres[k])
        energy = m(sine(freq, SR)[None])[0].mean(dim=-1)
        expected = int(np.abs(centres - freq).argmin())
        assert int(energy.argmax()) == expected, f"sine at {freq:.1f} Hz"


def test_logmel_power_spectrum_matches_numpy_stft() -> None:
    gen = torch.Generator().manual_seed(0)
    audio = torch.randn(3, SR // 2 + 37, generator=gen)
    m = LogMel()
    power = m.power_spectrum(audio).double().numpy()
    ref = np_power_spectrum(audio.numpy(), N_FFT, WIN, HOP)
    assert power.shape == ref.shape
    np.testing.assert_allclose(power, ref, rtol=1e-4, atol=1e-5 * ref.max())
    # And the log-mel is exactly log(filterbank @ power + eps) of that spectrum.
    fb = np_filterbank(N_FFT, N_MELS, SR, F_MIN, SR / 2.0)
    np.testing.assert_allclose(
        m(audio).double().numpy(), np.log(fb @ ref + m.eps), rtol=1e-4, atol=1e-4
    )


def test_logmel_stays_float32_under_bf16_autocast() -> None:
    audio = torch.randn(2, SR // 4)
    m = LogMel()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(audio)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, m(audio))


# --- SpecAugment ----------------------------------------------------------------------------


def _features(batch: int = 8, n_freq: int = N_MELS, n_time: int = 101) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, n_freq, n_time, generator=gen) - 10.0  # log-mel-like: negative


def test_specaugment_is_identity_in_eval() -> None:
    x = _features()
    aug = SpecAugment().eval()
    assert torch.equal(aug(x), x)


def test_specaugment_fills_masks_with_example_mean() -> None:
    x = _features()
    aug = SpecAugment(freq_masks=2, freq_width=8, time_masks=2, time_width=10).train()
    torch.manual_seed(0)
    y = aug(x)
    mean = x.mean(dim=(1, 2), keepdim=True).expand_as(x)
    changed = y != x
    assert changed.any()
    torch.testing.assert_close(y[changed], mean[changed], rtol=0, atol=0)
    # Masks are whole mel rows and whole frames: a changed cell's row or column is all changed.
    rows, cols = changed.all(dim=2), changed.all(dim=1)
    assert torch.equal(changed, rows[:, :, None] | cols[:, None, :])
    assert (rows.sum(dim=1) <= aug.freq_masks * aug.freq_width).all()
    assert (cols.sum(dim=1) <= aug.time_masks * aug.time_width).all()
    # Per example: the batch does not share one mask.
    assert len({tuple(r.tolist()) for r in rows}) > 1


def _runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool mask."""
    padded = torch.cat([torch.tensor([False]), mask, torch.tensor([False])]).int()
    edges = torch.diff(padded)
    return (torch.nonzero(edges == -1).flatten() - torch.nonzero(edges == 1).flatten()).tolist()


def test_specaugment_single_mask_widths_are_bounded_and_span_the_range() -> None:
    width = 8
    aug = SpecAugment(freq_masks=1, freq_width=width, time_masks=1, time_width=width)
    torch.manual_seed(0)
    freq, time = aug.draw_masks(512, N_MELS, 101)
    assert freq.shape == (512, N_MELS) and time.shape == (512, 101)
    widths = []
    for mask in (*freq, *time):
        runs = _runs(mask)
        assert len(runs) <= 1, "one mask is one contiguous band"
        widths.append(runs[0] if runs else 0)
    # Uniform on {0..width}: all of it is reached in 1024 draws, nothing beyond.
    assert set(widths) == set(range(width + 1))


def test_specaugment_width_never_exceeds_the_axis() -> None:
    aug = SpecAugment(freq_masks=1, freq_width=50, time_masks=1, time_width=50)
    torch.manual_seed(0)
    freq, time = aug.draw_masks(64, 6, 5)
    assert freq.shape == (64, 6) and time.shape == (64, 5)
    assert freq.all(dim=1).any(), "widths clamp to the axis, so a full-width mask is possible"


def test_specaugment_deterministic_under_seed() -> None:
    x = _features()
    aug = SpecAugment().train()
    torch.manual_seed(123)
    a = aug(x)
    torch.manual_seed(123)
    b = aug(x)
    c = aug(x)  # the global RNG moved on: a fresh draw
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


# --- SpeechCNN ------------------------------------------------------------------------------


def test_speechcnn_shapes_and_parameter_names() -> None:
    torch.manual_seed(0)
    model = SpeechCNN(n_classes=5, channels=(8, 16, 32)).eval()
    assert model(torch.randn(3, SR)).shape == (3, 5)
    assert model(torch.randn(1, SR + 1234)).shape == (1, 5)
    names = dict(model.named_parameters())
    assert model.output_parameter_names() == {"head.weight", "head.bias"}
    assert model.output_parameter_names() <= set(names)
    assert model.num_params() == sum(p.numel() for p in names.values())
    assert not any(k.startswith("features.") for k in model.state_dict())


def test_speechcnn_rejects_too_many_pools_for_the_mel_bins() -> None:
    with pytest.raises(ValueError):
        SpeechCNN(n_classes=2, n_mels=4, channels=(4, 4, 4, 4))


def test_speechcnn_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = SpeechCNN(n_classes=3, channels=(8, 16, 32)).train()
    logits = model(torch.randn(4, SR))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def _eval_accuracy_with_precise_bn(model: SpeechCNN, audio: torch.Tensor, labels) -> float:
    """Eval-mode accuracy of a copy whose BatchNorm statistics are re-estimated on `audio`.

    After a few dozen steps the running averages (momentum 0.1, initialised to mean 0, var 1)
    still mostly remember the initial weights, so raw eval accuracy would measure that lag, not
    what the weights learned. Re-estimating them (a cumulative average over one clean pass) is
    the standard "precise BN" fix; the weights themselves are untouched.
    """
    probe = copy.deepcopy(model)
    for bn in (m for m in probe.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: exact batch statistics after one pass
    probe.train()
    probe.augment.eval()
    with torch.no_grad():
        probe(audio)
        probe.eval()
        return (probe(audio).argmax(dim=1) == labels).float().mean().item()


def test_speechcnn_overfits_class_dependent_sines() -> None:
    n_classes, per_class = 4, 4
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    audio = torch.stack([sine(300.0 * (int(k) + 1), SR) for k in labels])
    audio = audio + 0.5 * torch.randn(audio.shape, generator=gen)
    torch.manual_seed(0)
    model = SpeechCNN(n_classes=n_classes, channels=(8, 16, 32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    max_steps, check_every, accuracy, step = 60, 10, 0.0, 0
    for step in range(1, max_steps + 1):
        model.train()  # SpecAugment and dropout on, as in real training
        loss = torch.nn.functional.cross_entropy(model(audio), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % check_every == 0:
            accuracy = _eval_accuracy_with_precise_bn(model, audio, labels)
            if accuracy == 1.0:
                break
    assert accuracy == 1.0, f"train accuracy {accuracy:.2f} after {step} steps"


def test_an_empty_batch_passes_through_with_zero_gradients() -> None:
    """Under DDP a rank with the smaller share runs an empty micro-batch; it must not fail."""
    from cadence.models.asr import SpeechCTC

    for model in (SpeechCNN(5, channels=(4, 8)), SpeechCTC(dim=16, layers=1)):
        out = model(torch.zeros(0, 16000))
        assert out.shape[0] == 0
        out.sum().backward()
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
