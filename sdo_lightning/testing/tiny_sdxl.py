"""A tiny random Stable-Diffusion-XL-shaped pipeline, saved in the layout users download.

Shaped like diffusers' own SDXL pipeline tests (a ``text_time`` UNet, ``CLIPTextModel`` +
``CLIPTextModelWithProjection``), smaller still, and with the two encoders of different widths
(8 and 16, like SDXL's 768 and 1280) so a swapped concatenation cannot go unnoticed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdo_lightning.testing.tiny_models import build_tiny_tokenizer

#: the tiny model's sizes: encoder widths, pooled projection, UNet time-id embedding width
HIDDEN_1, HIDDEN_2, PROJECTION, TIME_EMBED = 8, 16, 12, 4


def build_tiny_sdxl(root: Path, turbo: bool = False, time_cond_proj_dim: int | None = None, seed: int = 0) -> Path:
    """A tiny SDXL pipeline in ``root`` (latent 4x8x8, VAE factor 2: 16x16 images).

    The scheduler is SDXL-base's (``EulerDiscreteScheduler``, leading spacing), or with
    ``turbo`` SDXL-Turbo's (``EulerAncestralDiscreteScheduler``, trailing spacing). Its saved
    config also carries ``set_alpha_to_one: false`` and ``clip_sample: false`` as the real repos'
    configs do (keys Euler ignores, DDIM reads). ``time_cond_proj_dim`` gives the UNet the
    guidance embedding of LCM-distilled SDXL (``latent-consistency/lcm-sdxl``).
    """
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer, vocab = build_tiny_tokenizer(root / "_tok")
    # SDXL's second tokenizer pads with "!" instead of the end token
    tokenizer_2 = CLIPTokenizer(str(root / "_tok" / "vocab.json"), str(root / "_tok" / "merges.txt"),
                                model_max_length=77, pad_token="!")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2, norm_num_groups=4, use_linear_projection=True, cross_attention_dim=HIDDEN_1 + HIDDEN_2,
        # SDXL's micro-conditioning: 6 time ids (sizes, crop) embedded TIME_EMBED wide each + the pooled text
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + PROJECTION, time_cond_proj_dim=time_cond_proj_dim,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        scaling_factor=0.13025,  # SDXL's VAE
    )

    def clip_config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2,
                              num_hidden_layers=3, vocab_size=vocab, max_position_embeddings=77, bos_token_id=0,
                              eos_token_id=1, pad_token_id=1, projection_dim=PROJECTION)

    text_encoder = CLIPTextModel(clip_config(HIDDEN_1))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(HIDDEN_2))
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if turbo:
        scheduler = EulerAncestralDiscreteScheduler(**schedule, timestep_spacing="trailing")
    else:
        scheduler = EulerDiscreteScheduler(**schedule, timestep_spacing="leading")
    StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    ).save_pretrained(root)
    path = root / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "set_alpha_to_one": False, "clip_sample": False}))
    return root
