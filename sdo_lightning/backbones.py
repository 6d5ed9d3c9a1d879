"""Backbones: a diffusion model behind one small interface the LightningModules use.

A backbone loads the networks, turns a batch into conditioning, denoises (guidance included),
decodes latents to images in [0, 1] and encodes images back. It owns no optimization.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
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
        """A float embedding of ``cond`` that can be optimized, or None when there is none."""
        return None

    def with_embedding(self, cond: Any, embedding: Tensor) -> Any:
        """``cond`` with its embedding replaced by ``embedding`` (an optimized one)."""
        return embedding

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


def _speed_up(network: nn.Module, compile: bool | str, channels_last: bool) -> None:
    """Optional speed-ups of the denoiser, in place (state-dict keys unchanged)."""
    if channels_last:
        network.to(memory_format=torch.channels_last)
    if compile:
        # nn.Module.compile compiles forward in place; a string names the torch.compile backend.
        network.compile(**({} if compile is True else {"backend": compile}))


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
        compile: ``torch.compile`` the UNet (True, or the name of a backend).
        channels_last: store the UNet's weights channels-last (faster convolutions on GPUs).
    """

    NULL_CLASS = 10
    lora_target_modules = ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0"]

    def __init__(
        self, path: str | None = None, guidance_scale: float = 1.0, compile: bool | str = False, channels_last: bool = False
    ) -> None:
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
        _speed_up(self.unet, compile, channels_last)

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


@dataclass
class TextCondition:
    """Prompt embeddings and the negative-prompt embeddings classifier-free guidance needs."""

    embeds: Tensor
    negative_embeds: Tensor | None

    def __getitem__(self, index: Tensor) -> "TextCondition":
        neg = None if self.negative_embeds is None else self.negative_embeds[index]
        return TextCondition(self.embeds[index], neg)

    def to(self, device: torch.device | str) -> "TextCondition":
        neg = None if self.negative_embeds is None else self.negative_embeds.to(device)
        return TextCondition(self.embeds.to(device), neg)


def _load_failed(what: str, model: str, err: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"could not load the {what} from {model!r} ({type(err).__name__}); give a local diffusers pipeline "
        "directory, or a hub id with network access (e.g. fetch it first with `huggingface-cli download "
        f"{model}`)."
    )


class StableDiffusionBackbone(Backbone):
    """Stable Diffusion 1.x/2.x (UNet + CLIP text encoder + VAE), or an LCM-distilled SD UNet.

    Conditioning comes from ``batch["prompt"]`` (a list of strings). With ``guidance_scale > 1``
    the denoiser applies classifier-free guidance against ``negative_prompt``. For a UNet with a
    guidance embedding (LCM-distilled, ``time_cond_proj_dim`` set), the guidance scale is fed
    through that embedding instead, in one network call.

    Args:
        model: a diffusers pipeline directory or hub id (e.g. ``runwayml/stable-diffusion-v1-5``).
        guidance_scale: classifier-free guidance scale (1 = none).
        negative_prompt: the prompt guidance pushes away from.
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
        revision: the hub revision to load.
        variant: weights variant (e.g. ``fp16``).
        lora: optional LoRA weights (a directory or file in diffusers' format, e.g. LCM-LoRA)
            fused into the UNet after loading.
        compile: ``torch.compile`` the UNet (True, or the name of a backend).
        channels_last: store the UNet's weights channels-last (faster convolutions on GPUs).
    """

    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]

    def __init__(
        self,
        model: str,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        local_files_only: bool | None = None,
        revision: str | None = None,
        variant: str | None = None,
        lora: str | None = None,
        compile: bool | str = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        import os

        from diffusers import StableDiffusionPipeline

        if local_files_only is None:
            local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                model, safety_checker=None, requires_safety_checker=False, local_files_only=local_files_only,
                revision=revision, variant=variant,
            )
        except (OSError, ValueError) as err:
            raise _load_failed("Stable Diffusion pipeline", model, err) from err
        if lora is not None:
            pipe.load_lora_weights(lora)
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        self.scheduler_config = dict(pipe.scheduler.config)
        self.vae_scale = pipe.vae_scale_factor
        size = self.unet.config.sample_size
        self.latent_shape = (self.unet.config.in_channels, size, size)
        self.scaling_factor = self.vae.config.scaling_factor
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.guidance_embedding = self.unet.config.time_cond_proj_dim is not None
        _speed_up(self.unet, compile, channels_last)

    @property
    def network(self) -> nn.Module:
        return self.unet

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = self.text_encoder.device
        return self.text_encoder(tokens.input_ids.to(device))[0]

    def encode_condition(self, batch: dict[str, Any]) -> TextCondition:
        prompts = batch.get("prompt")
        if prompts is None:
            raise KeyError("StableDiffusionBackbone needs batch['prompt'] (a list of strings); use a PromptSet data module.")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds = self._embed(prompts)
        negative = None
        if self.guidance_scale != 1.0 and not self.guidance_embedding:
            negative = self._embed([self.negative_prompt] * len(prompts))
        return TextCondition(embeds, negative)

    def condition_embedding(self, cond: TextCondition) -> Tensor:
        return cond.embeds.detach().clone()

    def with_embedding(self, cond: TextCondition, embedding: Tensor) -> TextCondition:
        return TextCondition(embedding, cond.negative_embeds)

    def _guidance_cond(self, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        # Sinusoidal embedding of (w - 1) * 1000, the guidance input of LCM-distilled UNets.
        dim = self.unet.config.time_cond_proj_dim
        w = torch.full((n,), (self.guidance_scale - 1.0) * 1000.0, device=device)
        freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(dim // 2, device=device) / (dim // 2 - 1))
        args = w[:, None] * freqs[None]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
        if dim % 2:
            emb = torch.nn.functional.pad(emb, (0, 1))
        return emb.to(dtype)

    def denoise(self, x: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        dtype = self.unet.dtype
        model_in = x.to(dtype)
        if self.guidance_embedding:
            tc = self._guidance_cond(len(x), x.device, dtype)
            return self.unet(model_in, t, encoder_hidden_states=cond.embeds.to(dtype), timestep_cond=tc).sample.to(x.dtype)
        if cond.negative_embeds is None:
            return self.unet(model_in, t, encoder_hidden_states=cond.embeds.to(dtype)).sample.to(x.dtype)
        both = torch.cat([cond.negative_embeds, cond.embeds]).to(dtype)
        out = self.unet(torch.cat([model_in, model_in]), t, encoder_hidden_states=both).sample.to(x.dtype)
        uncond, text = out.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)

    def decode(self, latents: Tensor) -> Tensor:
        images = self.vae.decode((latents / self.scaling_factor).to(self.vae.dtype)).sample.to(latents.dtype)
        images = (images + 1) / 2
        return images + (images.clamp(0, 1) - images).detach()

    def encode(self, images: Tensor) -> Tensor:
        posterior = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        return posterior.mean.to(images.dtype) * self.scaling_factor

    def save_lora(self, directory: str | Path) -> Path:
        """Write the UNet adapter in diffusers' format: ``pipeline.load_lora_weights(directory)``."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        from sdo_lightning.lora import lora_state_dict

        directory = Path(directory)
        layers = convert_state_dict_to_diffusers(lora_state_dict(self.unet))
        StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers)
        return directory
