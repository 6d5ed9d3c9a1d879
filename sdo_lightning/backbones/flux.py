"""FLUX.1 (schnell, dev): a rectified-flow MMDiT (``FluxTransformer2DModel``) with CLIP and T5
text encoders and a 16-channel VAE.

The transformer reads latents as a sequence of 2x2 patches ("packed" tokens) with 3-axis
rotary position ids. The solvers' Euler step is elementwise, so the backbone keeps latents
unpacked, ``(16, H/8, W/8)`` as the VAE makes them, and packs them inside :meth:`denoise`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdo_lightning.backbones.base import PooledTextCondition, PooledTextConditionedBackbone, apply_guidance, speed_up
from sdo_lightning.backbones.loading import (load_pipeline, save_pipeline_lora, scheduler_config)


def pack_latents(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` latents -> ``(B, H/2 * W/2, C * 4)`` tokens, one per 2x2 patch (row-major
    patches; within a token: channel, then patch row, then patch column)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` x ``width``."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(rows: int, cols: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """The rotary position ids ``(rows * cols, 3)`` of the packed tokens: (0, row, column)."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    ids = torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(rows * cols, 3)
    return ids.to(device=device, dtype=dtype)


class FluxBackbone(PooledTextConditionedBackbone):
    """FLUX.1 (``FluxTransformer2DModel`` + CLIP and T5 text encoders + 16-channel VAE).

    Conditioning comes from ``batch["prompt"]`` (a list of strings): T5 encodes it into
    ``max_sequence_length`` tokens and CLIP into one pooled vector. The transformer predicts a
    velocity; sample with :class:`~sdo_lightning.solvers.FlowMatchEuler`, whose schedule is set
    as ``FluxPipeline`` sets it (sigmas ``linspace(1, 1/N, N)``, shifted with the ``mu`` of the
    image's token count where the scheduler config shifts dynamically). FLUX.1-dev is
    guidance-distilled: ``guidance_scale`` enters through its guidance embedding, in one network
    call. FLUX.1-schnell has no guidance embedding (``guidance_scale`` is ignored) and is
    timestep-distilled for 1-4 steps. Neither is an LCM model: use ``FlowMatchEuler``, not
    ``LCMMultistep``. ``true_cfg_scale > 1`` adds real classifier-free guidance against
    ``negative_prompt`` (two calls per step, batched), as ``FluxPipeline(true_cfg_scale=...)``.

    Args:
        model: a diffusers pipeline directory or hub id (``black-forest-labs/FLUX.1-schnell``,
            ``black-forest-labs/FLUX.1-dev``).
        guidance_scale: the embedded guidance scale of guidance-distilled models (FLUX.1-dev: 3.5);
            ignored by models without a guidance embedding (FLUX.1-schnell).
        true_cfg_scale: classifier-free guidance scale against ``negative_prompt`` (1 = none, the
            default: FLUX.1 models are distilled to sample without it).
        negative_prompt: the prompt true CFG pushes away from.
        max_sequence_length: T5 tokens per prompt (at most 512); None for the model's default,
            512 with a guidance embedding (dev), else 256 (schnell).
        height: image height in pixels, a multiple of 16; None for the pipeline's default (1024).
        width: image width in pixels, a multiple of 16; None for the pipeline's default (1024).
        dtype: load the weights in this dtype (e.g. ``bfloat16``: the transformer holds 12B
            parameters, the T5-XXL encoder 4.8B); None keeps the default (float32).
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
        revision: the hub revision to load.
        variant: weights variant (e.g. ``fp16``).
        lora: optional LoRA weights (a directory or file in diffusers' format) fused into the
            transformer after loading.
        compile: ``torch.compile`` the transformer (True, or the name of a backend).
        channels_last: store the transformer's 4-D weights channels-last (it has none; kept for
            the options every backbone takes).
        checkpoint_decode: recompute the VAE decoder's activations in backward (activation
            checkpointing): the same gradient, without the decoder's activations held between the
            forward pass and backward, for one more decoder forward pass.
    """

    # the attention projections of both streams: the image stream's and the text stream's
    # (add_*_proj, to_add_out) in the joint blocks, and the single blocks' to_q/k/v
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

    def __init__(
        self,
        model: str,
        guidance_scale: float = 3.5,
        true_cfg_scale: float = 1.0,
        negative_prompt: str = "",
        max_sequence_length: int | None = None,
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
        from diffusers import FluxPipeline

        pipe = load_pipeline(FluxPipeline, model, "FLUX pipeline", local_files_only=local_files_only, revision=revision,
                             variant=variant, dtype=dtype, lora=lora)
        self._adopt(pipe, guidance_scale, true_cfg_scale, negative_prompt, max_sequence_length, height, width,
                    compile, channels_last)
        self.checkpoint_decode = checkpoint_decode
        self.fused_lora = lora

    def _adopt(self, pipe: Any, guidance_scale: float, true_cfg_scale: float, negative_prompt: str,
               max_sequence_length: int | None, height: int | None, width: int | None, compile: bool | str,
               channels_last: bool) -> None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        self.transformer, self.vae = pipe.transformer, pipe.vae
        self.text_encoder, self.text_encoder_2 = pipe.text_encoder, pipe.text_encoder_2
        self.tokenizer, self.tokenizer_2 = pipe.tokenizer, pipe.tokenizer_2
        for module in (self.transformer, self.vae, self.text_encoder, self.text_encoder_2):
            module.requires_grad_(False).eval()
        cfg = self.transformer.config
        self.guidance_embedding = bool(cfg.guidance_embeds)
        self.vae_scale = pipe.vae_scale_factor
        native = pipe.default_sample_size * self.vae_scale
        height, width = height or native, width or native
        multiple = self.vae_scale * 2  # the VAE's factor x the 2x2 patches of packing
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} (VAE factor x 2 for FLUX's 2x2 "
                             f"patches), got {height}x{width}.")
        self.latent_shape = (cfg.in_channels // 4, height // self.vae_scale, width // self.vae_scale)
        if max_sequence_length is None:
            max_sequence_length = 512 if self.guidance_embedding else 256
        if not 0 < max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be between 1 and 512 (FLUX's T5 limit), got "
                             f"{max_sequence_length}.")
        self.max_sequence_length = max_sequence_length
        self.guidance_scale = guidance_scale
        self.true_cfg_scale = true_cfg_scale
        self.negative_prompt = negative_prompt
        # FluxPipeline always passes sigmas linspace(1, 1/N, N) and the mu of its packed token
        # count to set_timesteps; the scheduler uses mu only where it shifts dynamically (dev)
        config = scheduler_config(pipe.scheduler)
        tokens = (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        config["sdo_set_timesteps"] = {"mu": float(mu), "sigmas": "linspace"}
        self.scheduler_config = config
        speed_up(self.transformer, compile, channels_last)

    @property
    def network(self) -> nn.Module:
        return self.transformer

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """T5 sequence embeddings and pooled CLIP embeddings, as ``FluxPipeline.encode_prompt``
        makes them (no attention masks: FLUX attends to the T5 padding too)."""
        clip = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt")
        pooled = self.text_encoder(clip.input_ids.to(self.text_encoder.device)).pooler_output
        t5 = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                              return_tensors="pt")
        embeds = self.text_encoder_2(t5.input_ids.to(self.text_encoder_2.device))[0]
        return embeds, pooled

    def encode_condition(self, batch: dict[str, Any]) -> PooledTextCondition:
        prompts = self.prompts(batch)
        embeds, pooled = self._embed(prompts)
        if self.true_cfg_scale <= 1.0:
            return PooledTextCondition(embeds, None, pooled=pooled)
        negative, negative_pooled = self._embed([self.negative_prompt] * len(prompts))
        return PooledTextCondition(embeds, negative, pooled=pooled, negative_pooled=negative_pooled)

    def denoise(self, x: Tensor, t: Tensor, cond: PooledTextCondition) -> Tensor:
        """The velocity at ``(x, t)``: ``x`` unpacked ``(B, C, H, W)``, ``t`` = sigma * 1000."""
        height, width = x.shape[-2:]
        dtype = self.transformer.dtype
        tokens, embeds, pooled = pack_latents(x.to(dtype)), cond.embeds, cond.pooled
        guided = cond.negative_embeds is not None
        if guided:
            tokens = torch.cat([tokens, tokens])
            embeds = torch.cat([cond.negative_embeds, embeds])
            pooled = torch.cat([cond.negative_pooled, pooled])
        n = len(tokens)
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        t = (t.expand(n) if len(t) == 1 else t.repeat(n // len(t))).to(dtype)
        guidance = None
        if self.guidance_embedding:
            guidance = torch.full((n,), self.guidance_scale, device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=tokens, timestep=t / 1000, guidance=guidance, pooled_projections=pooled.to(dtype),
            encoder_hidden_states=embeds.to(dtype), txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype),
            img_ids=latent_image_ids(height // 2, width // 2, x.device, dtype), return_dict=False,
        )[0]
        v = unpack_latents(out, height, width).to(x.dtype)
        if not guided:
            return v
        return apply_guidance(v, self.true_cfg_scale)

    def save_lora(self, directory: str | Path) -> Path:
        """Write the transformer adapter in diffusers' FLUX format: ``pipeline.load_lora_weights(directory)``."""
        from diffusers import FluxPipeline

        return save_pipeline_lora(FluxPipeline, self.transformer, directory, "transformer")
