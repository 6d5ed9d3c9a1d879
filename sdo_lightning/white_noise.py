"""Projection of a latent onto the statistics of white Gaussian noise.

Gradient steps on a starting noise x_T drift off the noise the model was trained on: the mean of
a sample moves, its variance grows or shrinks, and power gathers in a few spatial frequencies
(a pattern the objective likes), while the model only ever saw i.i.d. N(0, 1) noise. The norm
shell (``StartNoise(project_to_shell: true)``) fixes the total power alone. This projection
restores, per sample and channel, what white noise of unit variance has:

1. mean 0: the zero-frequency coefficient is removed;
2. a flat power spectrum: the orthonormal 2-D Fourier coefficients are grouped into rings of equal
   integer radius ``round(sqrt(fy^2 + fx^2))`` (signed frequencies) and each ring is rescaled so
   that its mean power equals the others' (phases, and the power's distribution within a ring,
   are kept); white noise has ``E|F_k|^2 = 1`` at every frequency;
3. variance 1 over the pixels.

A ring and its mirror ``-k`` have the same radius, so the rescaling keeps the coefficients'
Hermitian symmetry and the result is real. Latents that are not images (``(B, tokens, C)``, as
FLUX packs them) get steps 1 and 3 per sample, over all their entries.
Projection onto white-noise statistics as a prior for noise optimization: arXiv 2602.08646.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ring_index(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """``(H, W)`` integer radius of each 2-D FFT frequency (signed frequencies, ``torch.fft.fftfreq``
    order), the ring it belongs to."""
    fy = torch.fft.fftfreq(height, d=1.0 / height, device=device)
    fx = torch.fft.fftfreq(width, d=1.0 / width, device=device)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).round().long()


def project_to_white_noise(x: Tensor, spectrum: bool = True, eps: float = 1e-12) -> Tensor:
    """``x`` with the per-sample, per-channel statistics of unit white noise: mean 0, variance 1
    and (``spectrum``, for ``(B, C, H, W)`` latents) equal mean power in every frequency ring.

    Computed in float32 (or float64 for float64 input) and returned in ``x``'s dtype; no
    gradient is meant to flow through it (the targets apply it after each optimizer step)."""
    work = x.double() if x.dtype == torch.float64 else x.float()
    if x.dim() == 4 and spectrum:
        b, c, h, w = work.shape
        coeffs = torch.fft.fft2(work, norm="ortho")
        rings = ring_index(h, w, work.device).flatten()
        n_rings = int(rings.max()) + 1
        power = coeffs.abs().pow(2).reshape(b, c, h * w)
        ring_power = torch.zeros(b, c, n_rings, dtype=power.dtype, device=power.device)
        ring_power.index_add_(2, rings, power)
        ring_size = torch.bincount(rings, minlength=n_rings).to(power.dtype)
        ring_mean = ring_power / ring_size
        scale = torch.rsqrt(ring_mean.clamp_min(eps))  # every ring to mean power 1
        scale[..., 0] = 0.0  # ring 0 is the mean alone: white noise has none
        coeffs = coeffs * scale[..., rings].reshape(b, c, h, w)
        work = torch.fft.ifft2(coeffs, norm="ortho").real
    dims = (2, 3) if x.dim() == 4 else tuple(range(1, x.dim()))
    work = work - work.mean(dim=dims, keepdim=True)
    work = work * torch.rsqrt(work.pow(2).mean(dim=dims, keepdim=True).clamp_min(eps))
    return work.to(x.dtype)
