"""PixArt-alpha: a DiT (``PixArtTransformer2DModel``) with a T5 text encoder and a VAE."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sdo_lightning.backbones.base import TextCondition, TextConditionedBackbone, apply_guidance, speed_up
from sdo_lightning.backbones.loading import (epsilon_half, epsilon_only, load_pipeline, load_t5_tokenizer, offline,
                                             scheduler_config)


class PixArtAlphaBackbone(TextConditionedBackbone):
    """PixArt-alpha (a DiT: ``PixArtTransformer2DModel`` + T5 text encoder + VAE).

    Conditioning comes from ``batch["prompt"]`` (a list of strings), encoded by T5 into
    ``max_sequence_length`` tokens with their attention mask (the transformer's cross-attention
    skips padding). With ``guidance_scale > 1`` the denoiser applies classifier-free guidance
    against ``negative_prompt``. The transformer predicts epsilon and a learned variance; the
    denoiser returns the epsilon half. Models with resolution / aspect-ratio conditioning (the
    1024px ones) receive the sampled image size.

    Args:
        model: a diffusers pipeline directory or hub id (e.g. ``PixArt-alpha/PixArt-XL-2-512x512``).
        guidance_scale: classifier-free guidance scale; 1 or below is none (as the pipelines: SD-Turbo's 0 too).
        negative_prompt: the prompt guidance pushes away from.
        max_sequence_length: T5 tokens per prompt (PixArt-alpha was trained with 120).
        height: image height in pixels; None for the model's native size.
        width: image width in pixels; None for the model's native size.
        dtype: load the weights in this dtype (e.g. ``bfloat16``: the T5-XXL encoder alone holds
            4.8B parameters); None keeps the default (float32).
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
        revision: the hub revision to load.
        variant: weights variant (e.g. ``fp16``).
        compile: ``torch.compile`` the transformer (True, or the name of a backend).
        channels_last: store the transformer's weights channels-last.
        checkpoint_decode: recompute the VAE decoder's activations in backward (activation
            checkpointing): the same gradient, without the decoder's activations held between the
            forward pass and backward, for one more decoder forward pass.
    """

    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]

    def __init__(
        self,
        model: str,
        guidance_scale: float = 4.5,
        negative_prompt: str = "",
        max_sequence_length: int = 120,
        height: int | None = None,
        width: int | None = None,
        dtype: str | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
        variant: str | None = None,
        compile: bool | str = False,
        channels_last: bool = False,
        checkpoint_decode: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import PixArtAlphaPipeline

        tokenizer = load_t5_tokenizer(model, local_files_only=offline(local_files_only), revision=revision)
        pipe = load_pipeline(PixArtAlphaPipeline, model, "PixArt-alpha pipeline", local_files_only=local_files_only,
                             revision=revision, variant=variant, dtype=dtype, tokenizer=tokenizer)
        self._adopt(pipe, guidance_scale, negative_prompt, max_sequence_length, height, width, compile, channels_last)
        self.checkpoint_decode = checkpoint_decode

    def _adopt(self, pipe: Any, guidance_scale: float, negative_prompt: str, max_sequence_length: int,
               height: int | None, width: int | None, compile: bool | str, channels_last: bool) -> None:
        self.transformer, self.vae, self.text_encoder = pipe.transformer, pipe.vae, pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        for module in (self.transformer, self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        self.scheduler_config = epsilon_only(scheduler_config(pipe.scheduler))
        self.vae_scale = pipe.vae_scale_factor
        cfg = self.transformer.config
        native = cfg.sample_size * self.vae_scale
        height, width = height or native, width or native
        multiple = self.vae_scale * cfg.patch_size
        if height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be multiples of {multiple} (VAE factor x patch size), got {height}x{width}."
            )
        self.latent_shape = (cfg.in_channels, height // self.vae_scale, width // self.vae_scale)
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length
        speed_up(self.transformer, compile, channels_last)

    @property
    def network(self) -> nn.Module:
        return self.transformer

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        # PixArt was trained on lower-cased captions and PixArtAlphaPipeline lower-cases and strips
        # every prompt (T5's tokenizer is case-sensitive): do the same.
        prompts = [p.lower().strip() for p in prompts]
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        device = self.text_encoder.device
        mask = tokens.attention_mask.to(device)
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0], mask

    def encode_condition(self, batch: dict[str, Any]) -> TextCondition:
        prompts = self.prompts(batch)
        embeds, mask = self._embed(prompts)
        negative = negative_mask = None
        if self.guidance_scale > 1.0:  # as the pipeline: guidance above 1 only
            negative, negative_mask = self._embed([self.negative_prompt] * len(prompts))
        return TextCondition(embeds, negative, mask, negative_mask)

    def _size_conditions(self, x: Tensor) -> dict[str, Tensor | None]:
        """Resolution and aspect ratio of the images ``x`` decodes to, for models trained with them."""
        if not self.transformer.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        height, width = x.shape[-2] * self.vae_scale, x.shape[-1] * self.vae_scale
        resolution = torch.tensor([height, width], dtype=x.dtype, device=x.device).expand(len(x), 2)
        aspect_ratio = torch.full((len(x), 1), height / width, dtype=x.dtype, device=x.device)
        return {"resolution": resolution, "aspect_ratio": aspect_ratio}

    def denoise(self, x: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        dtype = self.transformer.dtype
        model_in, embeds, mask = x.to(dtype), cond.embeds, cond.mask
        guided = cond.negative_embeds is not None
        if guided:
            model_in = torch.cat([model_in, model_in])
            embeds = torch.cat([cond.negative_embeds, embeds])
            mask = None if mask is None or cond.negative_mask is None else torch.cat([cond.negative_mask, mask])
        # the transformer's timestep embedding wants one timestep per sample
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        t = t.expand(len(model_in)) if len(t) == 1 else t.repeat(len(model_in) // len(t))
        out = self.transformer(model_in, encoder_hidden_states=embeds.to(dtype), encoder_attention_mask=mask, timestep=t,
                               added_cond_kwargs=self._size_conditions(model_in), return_dict=False)[0]
        out = epsilon_half(out, x.shape[1]).to(x.dtype)
        if not guided:
            return out
        return apply_guidance(out, self.guidance_scale)
