"""Pixel-space diffusion models: diffusers ``UNet2DModel`` pipelines, and the embedded digits default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdo_lightning.backbones.base import Backbone, row_timesteps, speed_up, unit_range
from sdo_lightning.backbones.loading import (epsilon_half, epsilon_only, from_subfolder_or_root, load_failed, offline,
                                             scheduler_config)


class _LookupOrPass(nn.Embedding):
    """An ``nn.Embedding`` that also accepts ready embeddings: float input passes through.

    Lets a class-conditional UNet take an optimized class embedding in place of a label while
    its state-dict keys stay those of the original embedding.
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Embedding's name
        if input.is_floating_point():
            return input
        return super().forward(input)


class PixelUNetBackbone(Backbone):
    """A pixel-space diffusers ``UNet2DModel``: DDPM/DDIM pipelines such as ``google/ddpm-cifar10-32``.

    Unconditional, or class-conditional when the UNet has ``num_class_embeds``: then each
    sample's class comes from ``batch["class_label"]``. The UNet works on images in [-1, 1];
    decoding maps them to [0, 1]. A learned-sigma UNet (twice the input channels out) is
    supported: its epsilon half is used.

    Args:
        model: a diffusers pipeline directory or hub id with ``unet/`` and ``scheduler/`` (or a
            directory with the UNet's and the scheduler's files at the top level).
        guidance_scale: classifier-free guidance scale (1 = none); needs ``null_class``.
        null_class: for a class-conditional UNet, the label it was trained with as "no class":
            used when the batch has no labels and as the unconditional branch of guidance.
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
        revision: the hub revision to load.
        variant: weights variant (e.g. ``fp16``).
        compile: ``torch.compile`` the UNet (True, or the name of a backend).
        channels_last: store the UNet's weights channels-last (faster convolutions on GPUs).
    """

    lora_target_modules = ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0"]

    def __init__(
        self,
        model: str,
        guidance_scale: float = 1.0,
        null_class: int | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
        variant: str | None = None,
        compile: bool | str = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import DDPMScheduler, UNet2DModel

        hub = {"local_files_only": offline(local_files_only), "revision": revision}
        try:
            unet = from_subfolder_or_root(UNet2DModel.from_pretrained, model, "unet", variant=variant, **hub)
            raw = from_subfolder_or_root(DDPMScheduler.load_config, model, "scheduler", **hub)
        except (OSError, ValueError) as err:
            raise load_failed("pixel-space UNet pipeline", model, err) from None
        self._setup(unet, raw, guidance_scale, null_class, compile, channels_last, source=model)

    def _adopt(self, pipe: Any, guidance_scale: float, null_class: int | None, compile: bool | str,
               channels_last: bool) -> None:
        # from_pipeline: a DDPMPipeline / DDIMPipeline (or anything with .unet and .scheduler)
        self._setup(pipe.unet, scheduler_config(pipe.scheduler), guidance_scale, null_class, compile, channels_last,
                    source="the given pipeline")

    def _setup(self, unet: nn.Module, raw: dict[str, Any], guidance_scale: float, null_class: int | None,
               compile: bool | str, channels_last: bool, source: str) -> None:
        import diffusers
        from diffusers import DDPMScheduler, SchedulerMixin

        self.unet = unet
        self.unet.requires_grad_(False)
        old = self.unet.class_embedding
        self.class_conditional = old is not None
        if null_class is not None and not self.class_conditional:
            raise ValueError(
                f"the UNet in {source} is not class-conditional (num_class_embeds is unset); leave null_class unset."
            )
        if guidance_scale != 1.0 and null_class is None:
            raise ValueError(
                "classifier-free guidance needs a class-conditional UNet and its null_class (the label trained "
                "as 'no class'); set null_class, or guidance_scale: 1."
            )
        if type(old) is nn.Embedding:  # a label lookup (class_embed_type unset): accept optimized embeddings too
            new = _LookupOrPass(old.num_embeddings, old.embedding_dim)
            new.weight = old.weight
            self.unet.class_embedding = new
        # The model's own scheduler class fills the defaults its file leaves out, as a pipeline would.
        scheduler_cls = getattr(diffusers, str(raw.get("_class_name")), None)
        if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, SchedulerMixin)):
            scheduler_cls = DDPMScheduler
        self.scheduler_config = epsilon_only(dict(scheduler_cls.from_config(raw).config))
        cfg = self.unet.config
        size = cfg.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (cfg.in_channels, height, width)
        self.guidance_scale = guidance_scale
        self.null_class = null_class
        speed_up(self.unet, compile, channels_last)

    @property
    def network(self) -> nn.Module:
        return self.unet

    def encode_condition(self, batch: dict[str, Any]) -> Tensor:
        n = len(next(iter(v for v in batch.values() if isinstance(v, Tensor))))
        if not self.class_conditional:
            # nothing to condition on; an empty per-sample tensor indexes and moves like a label
            return torch.zeros(n, 0, device=self.unet.device)
        labels = batch.get("class_label")
        if labels is None:
            if self.null_class is None:
                raise KeyError(f"{type(self).__name__}: the UNet is class-conditional; give batch['class_label'] "
                               "(SampleSet(class_label=...)) or set null_class.")
            labels = torch.full((n,), self.null_class, dtype=torch.long)
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.unet.device)
        classes = getattr(self.unet.class_embedding, "num_embeddings", None)
        if classes is not None and len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < classes):
            raise ValueError(f"{type(self).__name__}: class labels must be in 0..{classes - 1} (the UNet's classes), got "
                             f"{sorted(set(labels.tolist()))}; set the data module's class_label accordingly.")
        return labels

    def condition_embedding(self, cond: Tensor) -> Tensor | None:
        if not isinstance(self.unet.class_embedding, _LookupOrPass):
            return None
        return self.unet.class_embedding(cond).detach().clone()

    def denoise(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        model_in = x.to(self.unet.dtype)
        channels = x.shape[1]
        if not self.class_conditional:
            return epsilon_half(self.unet(model_in, t).sample, channels).to(x.dtype)
        conditional = cond.is_floating_point() or bool((cond != self.null_class).any())
        if self.guidance_scale == 1.0 or not conditional:
            return epsilon_half(self.unet(model_in, t, class_labels=cond).sample, channels).to(x.dtype)
        null = torch.full((len(x),), self.null_class, dtype=torch.long, device=x.device)
        if cond.is_floating_point():
            null = self.unet.class_embedding(null)
        both = self.unet(torch.cat([model_in, model_in]), row_timesteps(t, 2 * len(x)), class_labels=torch.cat([null, cond])).sample
        uncond, cond_out = epsilon_half(both, channels).to(x.dtype).chunk(2)
        return uncond + self.guidance_scale * (cond_out - uncond)

    def decode(self, latents: Tensor) -> Tensor:
        # The UNet works on images scaled to [-1, 1]; the decoder is that affine map.
        return unit_range((latents + 1) / 2, self.decode_clamp == "hard")

    def encode(self, images: Tensor) -> Tensor:
        return images * 2 - 1


class DigitsBackbone(PixelUNetBackbone):
    """The embedded default: a small class-conditional pixel-space UNet trained on digits.

    Conditioning is a class label 0-9 per sample, or 10 for "no class" (unconditional).
    Without a ``path`` it loads the weights shipped inside the package.

    Args:
        path: a directory with ``unet/`` (diffusers ``UNet2DModel``) and ``scheduler/``, as the
            recipe ``python -m sdo_lightning.digits.train`` writes; None for the shipped weights.
        guidance_scale: classifier-free guidance scale for conditional samples (1 = none).
        compile: ``torch.compile`` the UNet (True, or the name of a backend).
        channels_last: store the UNet's weights channels-last (faster convolutions on GPUs).
    """

    NULL_CLASS = 10
    #: the recipe's flag for this model (``python -m sdo_lightning.digits.train``)
    recipe_flag = ""

    def __init__(
        self, path: str | None = None, guidance_scale: float = 1.0, compile: bool | str = False, channels_last: bool = False
    ) -> None:
        root = Path(path) if path is not None else self.shipped_weights()
        if not (root / "unet" / "config.json").is_file():
            raise FileNotFoundError(
                f"no digits model in {root} (expected {root / 'unet' / 'config.json'}); train one with "
                f"`python -m sdo_lightning.digits.train{self.recipe_flag} --out {root}` or leave `path` unset for the "
                "shipped weights."
            )
        super().__init__(str(root), guidance_scale=guidance_scale, null_class=self.NULL_CLASS, local_files_only=True,
                         compile=compile, channels_last=channels_last)

    @staticmethod
    def shipped_weights() -> Path:
        from sdo_lightning import digits

        return digits.WEIGHTS_DIR


class FlowDigitsBackbone(DigitsBackbone):
    """The embedded flow-matching default: the digits UNet trained as a rectified flow (it
    predicts the velocity noise - x_0; sample it with ``FlowMatchEuler``).

    Conditioning is a class label 0-9 per sample, or 10 for "no class" (unconditional).
    Without a ``path`` it loads the weights shipped inside the package.

    Args:
        path: a directory with ``unet/`` and ``scheduler/`` (a ``FlowMatchEulerDiscreteScheduler``
            config), as ``python -m sdo_lightning.digits.train --flow`` writes; None for the
            shipped weights.
        guidance_scale: classifier-free guidance scale for conditional samples (1 = none).
        compile: ``torch.compile`` the UNet (True, or the name of a backend).
        channels_last: store the UNet's weights channels-last (faster convolutions on GPUs).
    """

    recipe_flag = " --flow"

    @staticmethod
    def shipped_weights() -> Path:
        from sdo_lightning import digits

        return digits.FLOW_WEIGHTS_DIR
