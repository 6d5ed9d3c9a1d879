"""Stable Diffusion XL (base, Turbo, LCM-distilled): a UNet with size micro-conditioning, two CLIP
text encoders and a VAE."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import Tensor, nn

from sdo_lightning.backbones.base import (PooledTextCondition, PooledTextConditionedBackbone, apply_guidance, row_timesteps,
                                          speed_up, vae_encode)
from sdo_lightning.backbones.loading import load_pipeline, save_pipeline_lora
from sdo_lightning.backbones.stable_diffusion import StableDiffusionBackbone


class StableDiffusionXLBackbone(PooledTextConditionedBackbone):
    """Stable Diffusion XL (UNet + two CLIP text encoders + VAE), SDXL-Turbo or an LCM-distilled SDXL UNet.

    Conditioning comes from ``batch["prompt"]`` (a list of strings), encoded as
    ``StableDiffusionXLPipeline`` does: the penultimate hidden states of both text encoders (CLIP
    ViT-L and OpenCLIP ViT-bigG) concatenated, and the pooled (projected) embedding of the second.
    The UNet also receives the size micro-conditioning of the sampled image (original size = target size = the image size,
    crop at 0, 0). With ``guidance_scale > 1`` the denoiser applies classifier-free guidance
    against ``negative_prompt``. For a UNet with a guidance embedding (LCM-distilled,
    ``time_cond_proj_dim`` set) the guidance scale is fed through that embedding instead.

    SDXL-Turbo (``stabilityai/sdxl-turbo``) is trained for 1-4 steps without guidance: use
    ``guidance_scale: 0`` and a DDIM solver with 1-4 steps; its scheduler config's trailing
    timestep spacing carries over. ``DDIM(eta=1, scheduler_kwargs={set_alpha_to_one: true})``
    reproduces the Turbo pipeline's own EulerAncestral sampler sample for sample, ``eta=0`` its
    deterministic (Euler) counterpart (from the same x_T: with trailing spacing the pipeline scales
    given latents by sigma_max, not sqrt(sigma_max^2 + 1), i.e. starts from 0.2% less noise).

    The SDXL VAE overflows in float16 (its config says ``force_upcast``): loaded with
    ``dtype: float16`` it is kept in float32, and it decodes outside float16 autocast, as the
    pipeline decodes. A VAE without ``force_upcast`` (e.g. ``madebyollin/sdxl-vae-fp16-fix``)
    runs in the dtype it was given.

    Args:
        model: a diffusers pipeline directory or hub id (e.g. ``stabilityai/stable-diffusion-xl-base-1.0``,
            ``stabilityai/sdxl-turbo``).
        guidance_scale: classifier-free guidance scale (<= 1 = none, as in the pipeline; 0 for SDXL-Turbo).
        negative_prompt: the prompt guidance pushes away from. None (the default) means no
            negative prompt: the unconditional embeddings are then zeros when the pipeline's
            ``force_zeros_for_empty_prompt`` is set (SDXL base and Turbo), else the empty prompt's;
            ``""`` encodes the empty prompt, as the pipeline does with ``negative_prompt=""``.
        height: image height in pixels; None for the UNet's native size (1024 for SDXL base; SDXL-Turbo
            was trained at 512).
        width: image width in pixels; None for the UNet's native size.
        dtype: load the weights in this dtype (e.g. ``float16`` or ``bfloat16``); None keeps the
            default (float32).
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
        revision: the hub revision to load.
        variant: weights variant (e.g. ``fp16``).
        lora: optional LoRA weights (a directory or file in diffusers' format, e.g.
            ``latent-consistency/lcm-lora-sdxl``) fused into the UNet after loading.
        compile: ``torch.compile`` the UNet (True, or the name of a backend).
        channels_last: store the UNet's weights channels-last (faster convolutions on GPUs).
        checkpoint_decode: recompute the VAE decoder's activations in backward (activation
            checkpointing): the same gradient, without the decoder's activations held between the
            forward pass and backward, for one more decoder forward pass.
    """

    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]

    def __init__(
        self,
        model: str,
        guidance_scale: float = 5.0,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        dtype: str | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
        variant: str | None = None,
        lora: str | None = None,
        compile: bool | str = False,
        channels_last: bool = False,
        checkpoint_decode: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import StableDiffusionXLPipeline

        pipe = load_pipeline(StableDiffusionXLPipeline, model, "Stable Diffusion XL pipeline",
                             local_files_only=local_files_only, revision=revision, variant=variant, dtype=dtype, lora=lora,
                             errors=(OSError, ValueError, TypeError), add_watermarker=False)
        self._adopt(pipe, guidance_scale, negative_prompt, height, width, compile, channels_last)
        self.checkpoint_decode = checkpoint_decode
        self.fused_lora = lora  # e.g. an LCM-LoRA (the solver check reads it)

    def _adopt(self, pipe: Any, guidance_scale: float, negative_prompt: str | None, height: int | None,
               width: int | None, compile: bool | str, channels_last: bool) -> None:
        if pipe.text_encoder is None or pipe.text_encoder_2 is None or pipe.unet.config.addition_embed_type != "text_time":
            raise ValueError("the pipeline is not a Stable Diffusion XL text-to-image pipeline (it needs text_encoder, "
                             "text_encoder_2 and a UNet with addition_embed_type 'text_time'); load Stable Diffusion "
                             "1.x/2.x models (SD-Turbo too) with StableDiffusionBackbone.")
        self.unet, self.vae = pipe.unet, pipe.vae
        self.text_encoder, self.text_encoder_2 = pipe.text_encoder, pipe.text_encoder_2
        self.tokenizer, self.tokenizer_2 = pipe.tokenizer, pipe.tokenizer_2
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            module.requires_grad_(False).eval()
        # SDXL's VAE overflows in float16: the pipeline decodes in float32 when force_upcast says so
        self.upcast_vae = bool(getattr(self.vae.config, "force_upcast", False))
        if self.upcast_vae and self.vae.dtype == torch.float16:
            self.vae.to(torch.float32)
        self.scheduler_config = dict(pipe.scheduler.config)
        self.vae_scale = pipe.vae_scale_factor
        native = self.unet.config.sample_size * self.vae_scale
        height, width = height or native, width or native
        if height % self.vae_scale or width % self.vae_scale:
            raise ValueError(f"height and width must be multiples of {self.vae_scale} (the VAE factor), "
                             f"got {height}x{width}.")
        self.latent_shape = (self.unet.config.in_channels, height // self.vae_scale, width // self.vae_scale)
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.force_zeros_for_empty_prompt = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
        self.guidance_embedding = self.unet.config.time_cond_proj_dim is not None
        speed_up(self.unet, compile, channels_last)

    @property
    def lcm_distilled(self) -> bool:
        return self.guidance_embedding or super().lcm_distilled

    @property
    def network(self) -> nn.Module:
        return self.unet

    # the sinusoidal (w - 1) embedding of LCM-distilled UNets, shared with Stable Diffusion's
    _guidance_cond = StableDiffusionBackbone._guidance_cond

    @property
    def guided(self) -> bool:
        """Whether ``denoise`` runs classifier-free guidance (two branches per call)."""
        return self.guidance_scale > 1.0 and not self.guidance_embedding

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Sequence embeddings ``(B, 77, D1 + D2)`` and pooled embeddings ``(B, P)`` of ``prompts``."""
        sequences = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            sequences.append(out.hidden_states[-2])  # SDXL reads the penultimate layer of both
        pooled = out.text_embeds  # the second encoder's projection
        dtype = self.text_encoder_2.dtype
        return torch.cat(sequences, dim=-1).to(dtype), pooled.to(dtype)

    def encode_condition(self, batch: dict[str, Any]) -> PooledTextCondition:
        prompts = self.prompts(batch)
        embeds, pooled = self._embed(prompts)
        negative = negative_pooled = None
        if self.guided and self.negative_prompt is None and self.force_zeros_for_empty_prompt:
            negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        elif self.guided:
            negative, negative_pooled = self._embed([self.negative_prompt or ""] * len(prompts))
        return PooledTextCondition(embeds, negative, pooled=pooled, negative_pooled=negative_pooled)

    def _time_ids(self, x: Tensor, n: int, dtype: torch.dtype) -> Tensor:
        """SDXL's micro-conditioning of the image ``x`` decodes to: original size, crop top-left,
        target size (the pipeline's defaults: original = target = the sampled size, no crop)."""
        height, width = x.shape[-2] * self.vae_scale, x.shape[-1] * self.vae_scale
        return torch.tensor([height, width, 0, 0, height, width], dtype=dtype, device=x.device).expand(n, 6)

    def denoise(self, x: Tensor, t: Tensor, cond: PooledTextCondition) -> Tensor:
        dtype = self.unet.dtype
        model_in, embeds, pooled = x.to(dtype), cond.embeds, cond.pooled
        guided = cond.negative_embeds is not None
        if guided:
            model_in = torch.cat([model_in, model_in])
            embeds = torch.cat([cond.negative_embeds, embeds])
            pooled = torch.cat([cond.negative_pooled, pooled])
        added = {"text_embeds": pooled.to(dtype), "time_ids": self._time_ids(x, len(model_in), dtype)}
        timestep_cond = self._guidance_cond(len(x), x.device, dtype) if self.guidance_embedding else None
        out = self.unet(model_in, row_timesteps(t, len(model_in)), encoder_hidden_states=embeds.to(dtype), timestep_cond=timestep_cond,
                        added_cond_kwargs=added).sample.to(x.dtype)
        if not guided:
            return out
        return apply_guidance(out, self.guidance_scale)

    def _vae_precision(self, device: torch.device) -> ContextManager:
        """Float16 autocast off around the VAE when its config asks for float32 (force_upcast)."""
        kind = device.type
        fp16 = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16
        return torch.autocast(kind, enabled=False) if self.upcast_vae and fp16 else nullcontext()

    def decode(self, latents: Tensor) -> Tensor:
        with self._vae_precision(latents.device):  # checkpointing's recomputation keeps this autocast state
            return super().decode(latents)

    def encode(self, images: Tensor) -> Tensor:
        with self._vae_precision(images.device):
            return vae_encode(self.vae, images)

    def save_lora(self, directory: str | Path) -> Path:
        """Write the UNet adapter in diffusers' SDXL format: ``pipeline.load_lora_weights(directory)``."""
        from diffusers import StableDiffusionXLPipeline

        return save_pipeline_lora(StableDiffusionXLPipeline, self.unet, directory, "unet")
