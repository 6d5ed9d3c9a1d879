"""project_to_white_noise against statistics computed independently with numpy."""

import numpy as np
import pytest
import torch

from sdo_lightning.white_noise import project_to_white_noise


def _rings(h, w):
    """Integer radius of each FFT frequency, written out index by index (numpy's FFT order)."""
    out = np.zeros((h, w), dtype=int)
    for i in range(h):
        for j in range(w):
            fy = i if i <= (h - 1) // 2 else i - h
            fx = j if j <= (w - 1) // 2 else j - w
            out[i, j] = int(np.floor(np.hypot(fy, fx) + 0.5))
    return out


def _drifted(shape, seed=0):
    """White noise that an optimizer pushed off its statistics: a shifted mean, a grown variance
    and a strong low-frequency stripe."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    _, _, h, w = shape
    stripe = torch.cos(2 * torch.pi * 3 * torch.arange(w, dtype=torch.float64) / w)
    return 1.7 * x + 0.4 + 2.5 * stripe.view(1, 1, 1, w)


@pytest.mark.parametrize("shape", [(3, 2, 16, 16), (2, 4, 12, 10), (1, 1, 7, 9)])
def test_mean_variance_and_a_flat_spectrum_per_sample_and_channel(shape):
    x = _drifted(shape)
    y = project_to_white_noise(x).numpy()
    b, c, h, w = shape
    rings = _rings(h, w)
    for s in range(b):
        for ch in range(c):
            img = y[s, ch]
            assert abs(img.mean()) < 1e-12 and img.var() == pytest.approx(1.0, rel=1e-12)
            power = np.abs(np.fft.fft2(img) / np.sqrt(h * w)) ** 2
            means = [power[rings == r].mean() for r in range(1, rings.max() + 1) if (rings == r).any()]
            # every ring at the same mean power: n / (n - 1) with n = H*W (the mean's coefficient is 0,
            # the other n - 1 coefficients share the unit variance)
            np.testing.assert_allclose(means, h * w / (h * w - 1), rtol=1e-10)
            assert power[0, 0] < 1e-20


def test_the_projection_is_idempotent_and_keeps_the_dtype():
    x = _drifted((2, 3, 16, 16)).float()
    once = project_to_white_noise(x)
    assert once.dtype == torch.float32
    torch.testing.assert_close(project_to_white_noise(once), once, rtol=1e-5, atol=1e-5)


def test_without_the_spectrum_and_for_packed_latents_mean_and_variance_only():
    x = _drifted((2, 3, 8, 8))
    y = project_to_white_noise(x, spectrum=False).numpy()
    ref = x.numpy()
    ref = (ref - ref.mean(axis=(2, 3), keepdims=True)) / ref.std(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-12)
    packed = torch.randn(2, 64, 16, dtype=torch.float64) * 3 + 1  # (B, tokens, features), as FLUX packs
    z = project_to_white_noise(packed).numpy()
    p = packed.numpy().reshape(2, -1)
    np.testing.assert_allclose(z.reshape(2, -1), (p - p.mean(1, keepdims=True)) / p.std(1, keepdims=True), rtol=1e-10)
