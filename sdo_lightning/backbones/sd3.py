"""Stable Diffusion 3 / 3.5: an MMDiT (``SD3Transformer2DModel``) conditioned on two CLIPs and T5,
sampled as a rectified flow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdo_lightning.backbones.base import PooledTextCondition, PooledTextConditionedBackbone, apply_guidance, speed_up
from sdo_lightning.backbones.loading import (load_failed, load_pipeline, offline, save_pipeline_lora, scheduler_config)


class StableDiffusion3Backbone(PooledTextConditionedBackbone):
    """Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel`` + CLIP-L + CLIP-G + optional T5-XXL + VAE).

    Conditioning comes from ``batch["prompt"]`` (a list of strings), encoded as
    ``StableDiffusion3Pipeline.encode_prompt`` does: the penultimate hidden states of both CLIPs,
    concatenated on the feature axis and zero-padded to T5's width, followed on the sequence axis
    by T5's ``max_sequence_length`` tokens (zeros when the pipeline has no T5); and both CLIPs'
    pooled (projected) embeddings, concatenated. With ``guidance_scale > 1`` the denoiser applies
    classifier-free guidance against ``negative_prompt``, as the pipeline does (its skip-layer
    guidance is not applied). The transformer predicts the flow velocity and reads the timestep
    as the scheduler gives it (sigma * 1000); sample with
    :class:`~sdo_lightning.solvers.FlowMatchEuler`. A scheduler with ``use_dynamic_shifting``
    gets the pipeline's ``mu`` for the latent size (``scheduler_config["sdo_set_timesteps"]``).

    The optimizable prompt embedding (``target: embedding``) is one flat tensor per sample: the
    token sequence followed by the pooled vector.

    Args:
        model: a diffusers pipeline directory or hub id (e.g. ``stabilityai/stable-diffusion-3.5-medium``).
        guidance_scale: classifier-free guidance scale (<= 1: none). 7.0 is the pipeline's default;
            the model cards recommend 4.5 for 3.5-medium (40 steps) and 3.5 for 3.5-large (28 steps).
        negative_prompt: the prompt guidance pushes away from.
        max_sequence_length: T5 tokens per prompt (the pipeline's default 256; at most 512).
        text_encoder_3: load the T5-XXL encoder (4.8B parameters); False drops it and, as the
            pipeline does, feeds zeros in its place. A pipeline saved without T5 loads without it.
        height: image height in pixels; None for the model's native size.
        width: image width in pixels; None for the model's native size.
        dtype: load the weights in this dtype (e.g. ``bfloat16``, as SD3.5 is shipped); None keeps
            the default (float32).
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
        revision: the hub revision to load.
        variant: weights variant (e.g. ``fp16``).
        lora: optional LoRA weights (a directory or file in diffusers' SD3 format) fused into the
            transformer after loading.
        compile: ``torch.compile`` the transformer (True, or the name of a backend).
        channels_last: store the transformer's weights channels-last.
        checkpoint_decode: recompute the VAE decoder's activations in backward (activation
            checkpointing): the same gradient, without the decoder's activations held between the
            forward pass and backward, for one more decoder forward pass.
    """

    # the attention projections of the joint blocks: image stream (to_*; also attn2 of 3.5-medium's
    # MMDiT-X blocks) and text stream (add_*_proj, to_add_out), as diffusers' SD3 LoRA scripts adapt
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

    def __init__(
        self,
        model: str,
        guidance_scale: float = 7.0,
        negative_prompt: str = "",
        max_sequence_length: int = 256,
        text_encoder_3: bool = True,
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
        from diffusers import StableDiffusion3Pipeline

        hub = {"local_files_only": offline(local_files_only), "revision": revision}
        try:
            index = StableDiffusion3Pipeline.load_config(model, **hub)
        except (OSError, ValueError) as err:
            raise load_failed("Stable Diffusion 3 pipeline", model, err) from None
        # diffusers refuses a pipeline saved without T5 unless told so
        saved_t5 = (index.get("text_encoder_3") or [None])[0] is not None
        no_t5 = {} if text_encoder_3 and saved_t5 else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = load_pipeline(StableDiffusion3Pipeline, model, "Stable Diffusion 3 pipeline", local_files_only=local_files_only,
                             revision=revision, variant=variant, dtype=dtype, lora=lora, **no_t5)
        self._adopt(pipe, guidance_scale, negative_prompt, max_sequence_length, height, width, compile, channels_last)
        self.checkpoint_decode = checkpoint_decode
        self.fused_lora = lora

    def _adopt(self, pipe: Any, guidance_scale: float, negative_prompt: str, max_sequence_length: int,
               height: int | None, width: int | None, compile: bool | str, channels_last: bool) -> None:
        if max_sequence_length > 512:
            raise ValueError(f"max_sequence_length must be at most 512 (T5's limit in SD3), got {max_sequence_length}.")
        self.transformer, self.vae = pipe.transformer, pipe.vae
        self.text_encoder, self.text_encoder_2 = pipe.text_encoder, pipe.text_encoder_2
        self.text_encoder_3 = pipe.text_encoder_3  # None: T5 dropped
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3
        for module in (self.transformer, self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3):
            if module is not None:
                module.requires_grad_(False).eval()
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
        self.scheduler_config = self._with_shift_mu(scheduler_config(pipe.scheduler))
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length
        speed_up(self.transformer, compile, channels_last)

    def _with_shift_mu(self, config: dict[str, Any]) -> dict[str, Any]:
        """The pipeline's scheduler config, with the ``mu`` its pipeline passes to ``set_timesteps``
        under dynamic shifting: linear in the latent's token count (the SD3 pipeline's defaults)."""
        if not config.get("use_dynamic_shifting"):
            return config  # SD3 passes neither sigmas nor mu: the scheduler's static shift applies
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        patch = self.transformer.config.patch_size
        tokens = (self.latent_shape[1] // patch) * (self.latent_shape[2] // patch)
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        return {**config, "sdo_set_timesteps": {"mu": float(mu)}}

    @property
    def network(self) -> nn.Module:
        return self.transformer

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(token sequence (B, 77 + max_sequence_length, D_T5), pooled (B, P)) of ``prompts``."""
        device, dtype = self.text_encoder.device, self.text_encoder.dtype
        hidden, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            # both CLIPs take the first tokenizer's length (77), as the pipeline does
            ids = tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(device, dtype))  # penultimate layer
            pooled.append(out.text_embeds.to(device))
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, self.transformer.config.joint_attention_dim,
                             device=device, dtype=dtype)
        else:
            ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                   add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.text_encoder_3(ids.to(self.text_encoder_3.device))[0].to(device)  # no mask, as the pipeline
        clip = torch.cat(hidden, dim=-1)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def encode_condition(self, batch: dict[str, Any]) -> PooledTextCondition:
        prompts = self.prompts(batch)
        embeds, pooled = self._embed(prompts)
        negative = negative_pooled = None
        if self.guidance_scale > 1:
            negative, negative_pooled = self._embed([self.negative_prompt] * len(prompts))
        return PooledTextCondition(embeds, negative, pooled=pooled, negative_pooled=negative_pooled)

    def denoise(self, x: Tensor, t: Tensor, cond: PooledTextCondition) -> Tensor:
        dtype = self.transformer.dtype
        model_in, embeds, pooled = x.to(dtype), cond.embeds, cond.pooled
        guided = cond.negative_embeds is not None
        if guided:
            model_in = torch.cat([model_in, model_in])
            embeds = torch.cat([cond.negative_embeds, embeds])
            pooled = torch.cat([cond.negative_pooled, pooled])
        # one timestep per sample, sigma * 1000 as the scheduler gives it (SD3 does not divide by 1000)
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        t = t.expand(len(model_in)) if len(t) == 1 else t.repeat(len(model_in) // len(t))
        out = self.transformer(hidden_states=model_in, timestep=t, encoder_hidden_states=embeds.to(dtype),
                               pooled_projections=pooled.to(dtype), return_dict=False)[0].to(x.dtype)
        if not guided:
            return out
        return apply_guidance(out, self.guidance_scale)

    def save_lora(self, directory: str | Path) -> Path:
        """Write the transformer adapter in diffusers' SD3 format: ``pipeline.load_lora_weights(directory)``."""
        from diffusers import StableDiffusion3Pipeline

        return save_pipeline_lora(StableDiffusion3Pipeline, self.transformer, directory, "transformer")
