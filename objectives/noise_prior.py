"""The chi prior on the norm of the optimized noise (ReNO, Eyring et al. 2024)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdo_lightning.contracts import Objective


class NoiseNormPrior(Objective):
    """``-log p_chi(||z||)`` of each sample's start latent ``z``, shifted to be 0 at the mode; lower is better.

    Notation: ``z`` is one sample's start latent with ``D`` elements, ``r = ||z||``, ``m = sqrt(D - 1)``.

    1. If ``z`` holds ``D`` independent standard normals, ``r`` follows a chi distribution with ``D``
       degrees of freedom: ``log p(r) = (D - 1) log r - r^2 / 2 - (D / 2 - 1) log 2 - lgamma(D / 2)``,
       a sharp peak at its mode ``m`` (width about 0.7 whatever ``D``).
    2. The loss is ``-log p(r) + log p(m) = (D - 1) * ((u^2 - 1) / 2 - log u)`` with ``u = r / m``: 0 at
       the mode and positive elsewhere. The constant left out is ``-log p(m)``, which depends on ``D``
       only, so gradients and comparisons between latents of one size are those of ``-log p(r)``
       (for ``D = 1`` the loss is ``r^2 / 2``).
    3. With ``e = r^2 / m^2 - 1`` that is ``(D - 1) / 2 * (e - log1p(e))``, computed in float32
       (float64 for float64 latents) whatever precision the model runs in. No power of the norm is
       formed, so it is finite for any ``D`` (e.g. 65536 for a 4 x 128 x 128 latent, norm about
       256), and ``r^2 - D`` is summed as ``sum(z_i^2 - 1)``, whose partial sums stay near 0 rather
       than growing to ``D``: float32 then keeps the digits the steep peak needs (at ``D = 65536``
       the loss is within 3e-5 of float64 between the 1e-4 and 1 - 1e-4 quantiles of ``r``, against
       6e-4 from a float32 sum of squares).

    Beside a reward in a :class:`~sdo_lightning.objectives.WeightedSum` it keeps the optimized noise
    where Gaussian noise lives, softly, as ReNO's norm regularizer does. Use it with
    ``StartNoise(project_to_shell: false)`` or a ``linf_radius``: the default shell projection
    already holds ``||z||`` fixed, which makes this term a constant.

    It scores the latent, not the images: it reads ``batch["latent"]``, which
    :class:`~sdo_lightning.LatentOptimization` fills with the trajectory's start latent
    (differentiable in the optimized variable). Losses are float32 (float64 for float64 latents).
    Logs ``noise_norm``, ``||z|| / sqrt(D)`` per sample (about 1 for Gaussian noise).
    """

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        if "latent" not in batch:
            raise KeyError("NoiseNormPrior scores the start latent of each trajectory, batch['latent'], which this "
                           "batch lacks; use it under LatentOptimization, which optimizes the noise "
                           "(RewardFineTuning draws fresh noise and gives no latent).")
        latent = batch["latent"]
        # half precision would overflow the sum of squares (65504 is fp16's largest value)
        work = latent.flatten(1).to(torch.promote_types(latent.dtype, torch.float32))
        dims = work.shape[1]
        excess = (work.square() - 1).sum(1)  # r^2 - D
        self.terms = {"noise_norm": (1 + excess / dims).clamp_min(0).sqrt().detach()}
        if dims == 1:  # a half-normal: mode 0
            return (excess + 1) / 2
        e = (excess + 1) / (dims - 1)  # r^2 / m^2 - 1
        return (dims - 1) / 2 * (e - torch.log1p(e))
