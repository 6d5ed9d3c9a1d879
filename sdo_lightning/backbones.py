"""Backbones: a diffusion model behind one small interface the LightningModules use.

A backbone loads the networks, turns a batch into conditioning, denoises (guidance included),
decodes latents to images in [0, 1] and encodes images back. It owns no optimization.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class Backbone(nn.Module, abc.ABC):
    """The interface between a diffusion model and the optimization code.

    Attributes:
        scheduler_config: the model's training noise schedule (a diffusers scheduler config),
            handed to every :class:`~sdo_lightning.Solver`.
        latent_shape: ``(C, H, W)`` of one latent.
    """

    scheduler_config: dict[str, Any]
    latent_shape: tuple[int, int, int]
    #: layer names LoRA adapts by default (peft ``target_modules``)
    lora_target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]

    @property
    @abc.abstractmethod
    def network(self) -> nn.Module:
        """The denoising network (UNet or transformer) that fine-tuning adapts."""

    @abc.abstractmethod
    def encode_condition(self, batch: dict[str, Any]) -> Any:
        """Conditioning for ``denoise`` from a batch (class labels, prompts, ...)."""

    def condition_embedding(self, cond: Any) -> Tensor | None:
        """A float embedding of ``cond`` that can be optimized and given back to ``denoise``,
        or None when the backbone has no such embedding."""
        return None

    @abc.abstractmethod
    def denoise(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        """The network output at ``(x, t)``, with classifier-free guidance where configured."""

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` in ``[0, 1]`` from latents (differentiable)."""

    @abc.abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Latents from images in ``[0, 1]`` (for inversion of real images)."""

    def save_lora(self, directory: str | Path) -> Path:
        """Write the network's LoRA adapter; peft's layout unless a backbone has a better one."""
        from sdo_lightning.lora import save_adapter

        return save_adapter(self.network, directory)


class _LookupOrPass(nn.Embedding):
    """An ``nn.Embedding`` that also accepts ready embeddings: float input passes through.

    Lets a class-conditional UNet take an optimized class embedding in place of a label while
    its state-dict keys stay those of the original embedding.
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Embedding's name
        if input.is_floating_point():
            return input
        return super().forward(input)


class DigitsBackbone(Backbone):
    """The embedded default: a small class-conditional pixel-space UNet trained on digits.

    Conditioning is a class label 0-9 per sample, or 10 for "no class" (unconditional).
    Without a ``path`` it loads the weights shipped inside the package.

    Args:
        path: a directory with ``unet/`` (diffusers ``UNet2DModel``) and ``scheduler/``, as the
            recipe ``python -m sdo_lightning.digits.train`` writes; None for the shipped weights.
        guidance_scale: classifier-free guidance scale for conditional samples (1 = none).
    """

    NULL_CLASS = 10
    lora_target_modules = ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0"]

    def __init__(self, path: str | None = None, guidance_scale: float = 1.0) -> None:
        super().__init__()
        from diffusers import DDPMScheduler, UNet2DModel

        from sdo_lightning.digits import WEIGHTS_DIR

        root = Path(path) if path is not None else WEIGHTS_DIR
        if not (root / "unet" / "config.json").is_file():
            raise FileNotFoundError(
                f"no digits model in {root} (expected {root / 'unet' / 'config.json'}); train one with "
                f"`python -m sdo_lightning.digits.train --out {root}` or leave `path` unset for the shipped weights."
            )
        self.unet = UNet2DModel.from_pretrained(root / "unet")
        self.unet.requires_grad_(False)
        old = self.unet.class_embedding
        if old is None:
            raise ValueError(f"the UNet in {root} is not class-conditional (num_class_embeds is unset).")
        new = _LookupOrPass(old.num_embeddings, old.embedding_dim)
        new.weight = old.weight
        self.unet.class_embedding = new
        self.scheduler_config = dict(DDPMScheduler.from_pretrained(root / "scheduler").config)
        cfg = self.unet.config
        self.latent_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.guidance_scale = guidance_scale

    @property
    def network(self) -> nn.Module:
        return self.unet

    def encode_condition(self, batch: dict[str, Any]) -> Tensor:
        labels = batch.get("class_label")
        if labels is None:
            n = len(next(iter(v for v in batch.values() if isinstance(v, Tensor))))
            labels = torch.full((n,), self.NULL_CLASS, dtype=torch.long)
        return torch.as_tensor(labels, dtype=torch.long, device=self.unet.device)

    def condition_embedding(self, cond: Tensor) -> Tensor:
        return self.unet.class_embedding(cond).detach().clone()

    def denoise(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        model_in = x.to(self.unet.dtype)
        conditional = cond.is_floating_point() or bool((cond != self.NULL_CLASS).any())
        if self.guidance_scale == 1.0 or not conditional:
            return self.unet(model_in, t, class_labels=cond).sample.to(x.dtype)
        null = torch.full((len(x),), self.NULL_CLASS, dtype=torch.long, device=x.device)
        if cond.is_floating_point():
            null = self.unet.class_embedding(null)
        both = self.unet(torch.cat([model_in, model_in]), t, class_labels=torch.cat([null, cond])).sample
        uncond, cond_out = both.to(x.dtype).chunk(2)
        return uncond + self.guidance_scale * (cond_out - uncond)

    def decode(self, latents: Tensor) -> Tensor:
        # The UNet works on images scaled to [-1, 1]; the decoder is that affine map, clamped to
        # [0, 1] in the forward pass only: a plain clamp would give no gradient to the many
        # background pixels just below 0, so an objective could never add ink there.
        images = (latents + 1) / 2
        return images + (images.clamp(0, 1) - images).detach()

    def encode(self, images: Tensor) -> Tensor:
        return images * 2 - 1
