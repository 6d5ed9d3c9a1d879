"""Tiny random models of the families sdo-lightning loads, saved in the layouts users have."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def build_tiny_tokenizer(root: Path):
    """A character-level CLIP tokenizer (vocab + empty merges), since none can be downloaded."""
    from transformers import CLIPTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    for c in string.ascii_lowercase + string.digits + ".,!?'-":
        tokens += [c, c + "</w>"]
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=77), len(tokens)


def build_tiny_sd(root: Path, lcm: bool = False, seed: int = 0) -> Path:
    """A tiny Stable-Diffusion-shaped pipeline (UNet + CLIP text encoder + VAE) in ``root``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer, vocab = build_tiny_tokenizer(root / "_tok")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4, time_cond_proj_dim=8 if lcm else None,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=vocab,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root)
    return root


def build_tiny_clip(root: Path, seed: int = 0) -> Path:
    """A tiny random transformers CLIPModel with its tokenizer, saved in ``root``."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tokenizer, vocab = build_tiny_tokenizer(root)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                         vocab_size=vocab, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root
