"""A third-party backbone: an analytic diffusion model of Gaussian images, no weights to load.

The data are images whose pixels are independent Gaussians ``N(mean, std^2)`` in [-1, 1]
space. For such data the ideal epsilon-prediction network has a closed form: with
``x_t = sqrt(a) x_0 + sqrt(1 - a) eps``,
``E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mean) / (a std^2 + 1 - a)``.
It shows what a model family implements; a real one loads networks in ``__init__``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sdo_lightning.backbones import Backbone
from sdo_lightning.backbones.base import unit_range


class _GaussianDenoiser(nn.Module):
    def __init__(self, mean: float, std: float, alphas_cumprod: Tensor) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.tensor(float(mean)), requires_grad=False)
        self.std = std
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        a = self.alphas_cumprod[torch.as_tensor(t, device=x.device).long()].to(x.dtype)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mean) / (a * self.std**2 + 1 - a)


class GaussianBackbone(Backbone):
    """Images of independent Gaussian pixels, denoised exactly (an example model family).

    Args:
        mean: mean pixel value in [-1, 1] space.
        std: standard deviation of every pixel.
        size: image height and width.
        channels: image channels.
    """

    lora_target_modules: list[str] = []

    def __init__(self, mean: float = 0.0, std: float = 0.3, size: int = 8, channels: int = 1) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        schedule = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
        self.scheduler_config = dict(schedule.config)
        self.denoiser = _GaussianDenoiser(mean, std, schedule.alphas_cumprod)
        self.latent_shape = (channels, size, size)

    @property
    def network(self) -> nn.Module:
        return self.denoiser

    def encode_condition(self, batch: dict[str, Any]) -> Tensor:
        n = len(batch["index"])
        return torch.zeros(n, 0, device=self.denoiser.mean.device)  # unconditional: one empty row per sample

    def denoise(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self.denoiser(x, t)

    def decode(self, latents: Tensor) -> Tensor:
        return unit_range((latents + 1) / 2)

    def encode(self, images: Tensor) -> Tensor:
        return images * 2 - 1
