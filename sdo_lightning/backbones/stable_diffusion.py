"""Stable Diffusion 1.x/2.x and LCM-distilled SD UNets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdo_lightning.backbones.base import TextCondition, TextConditionedBackbone, apply_guidance, row_timesteps, speed_up
from sdo_lightning.backbones.loading import load_pipeline, save_pipeline_lora, scheduler_config


class StableDiffusionBackbone(TextConditionedBackbone):
    """Stable Diffusion 1.x/2.x (UNet + CLIP text encoder + VAE), or an LCM-distilled SD UNet.

    Conditioning comes from ``batch["prompt"]`` (a list of strings). With ``guidance_scale > 1``
    the denoiser applies classifier-free guidance against ``negative_prompt``. For a UNet with a
    guidance embedding (LCM-distilled, ``time_cond_proj_dim`` set), the guidance scale is fed
    through that embedding instead, in one network call.

    Args:
        model: a diffusers pipeline directory or hub id (e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``).
        guidance_scale: classifier-free guidance scale; 1 or below is none (as the pipelines: SD-Turbo's 0 too).
        negative_prompt: the prompt guidance pushes away from.
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
        revision: the hub revision to load.
        variant: weights variant (e.g. ``fp16``).
        lora: optional LoRA weights (a directory or file in diffusers' format, e.g. LCM-LoRA)
            fused into the UNet after loading.
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
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        local_files_only: bool | None = None,
        revision: str | None = None,
        variant: str | None = None,
        lora: str | None = None,
        compile: bool | str = False,
        channels_last: bool = False,
        checkpoint_decode: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import StableDiffusionPipeline

        pipe = load_pipeline(StableDiffusionPipeline, model, "Stable Diffusion pipeline", local_files_only=local_files_only,
                             revision=revision, variant=variant, lora=lora, safety_checker=None,
                             requires_safety_checker=False)
        self._adopt(pipe, guidance_scale, negative_prompt, compile, channels_last)
        self.checkpoint_decode = checkpoint_decode
        self.fused_lora = lora  # e.g. an LCM-LoRA (the solver check reads it)

    def _adopt(self, pipe: Any, guidance_scale: float, negative_prompt: str, compile: bool | str,
               channels_last: bool) -> None:
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        self.scheduler_config = scheduler_config(pipe.scheduler)
        self.vae_scale = pipe.vae_scale_factor
        size = self.unet.config.sample_size
        self.latent_shape = (self.unet.config.in_channels, size, size)
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.guidance_embedding = self.unet.config.time_cond_proj_dim is not None
        speed_up(self.unet, compile, channels_last)

    @property
    def lcm_distilled(self) -> bool:
        return self.guidance_embedding or super().lcm_distilled

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
        prompts = self.prompts(batch)
        embeds = self._embed(prompts)
        negative = None
        if self.guidance_scale > 1.0 and not self.guidance_embedding:  # as the pipeline: guidance above 1 only
            negative = self._embed([self.negative_prompt] * len(prompts))
        return TextCondition(embeds, negative)

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
        out = self.unet(torch.cat([model_in, model_in]), row_timesteps(t, 2 * len(x)), encoder_hidden_states=both).sample.to(x.dtype)
        return apply_guidance(out, self.guidance_scale)

    def save_lora(self, directory: str | Path) -> Path:
        """Write the UNet adapter in diffusers' format: ``pipeline.load_lora_weights(directory)``."""
        from diffusers import StableDiffusionPipeline

        return save_pipeline_lora(StableDiffusionPipeline, self.unet, directory, "unet")
