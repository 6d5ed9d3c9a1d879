"""A tiny random FLUX.1 pipeline (transformer + CLIP + T5 + VAE), saved in the layout users have.

The transformer is the small config diffusers' own FLUX tests use, with 64 input channels so the
VAE has FLUX's 16 latent channels (packed 2x2 into 64 per token); its rope axes (4, 4, 8) sum to
the attention head dim 16, as FLUX's rotary embedding needs. ``guidance_embeds=True`` makes a
dev-like model (guidance-distilled, guidance scale fed as an embedding), False a schnell-like one;
each gets its model's scheduler config (dev: dynamic shifting; schnell: shift 1, none).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdo_lightning.testing.tiny_models import build_tiny_t5_tokenizer, build_tiny_tokenizer

#: FLUX.1's VAE latent normalization (its vae/config.json)
FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR = 0.3611, 0.1159


def build_tiny_flux(root: Path, guidance_embeds: bool = False, seed: int = 0) -> Path:
    """A tiny FLUX.1-shaped pipeline saved in ``root``: dev-like with ``guidance_embeds``, else schnell-like."""
    tiny_flux_pipeline(root, guidance_embeds, seed).save_pretrained(root)
    return root


def tiny_flux_pipeline(root: Path, guidance_embeds: bool = False, seed: int = 0):
    """The ``FluxPipeline`` of :func:`build_tiny_flux`, in memory (its tokenizers' files go to ``root``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, clip_vocab = build_tiny_tokenizer(root / "_tok")
    tokenizer_2, t5_vocab = build_tiny_t5_tokenizer(root / "_tok2", max_length=512)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=clip_vocab,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=FLUX_SCALING_FACTOR, shift_factor=FLUX_SHIFT_FACTOR,
    )
    # the two models' scheduler configs: dev shifts with the image size, schnell does not
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0 if guidance_embeds else 1.0, use_dynamic_shifting=guidance_embeds,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
