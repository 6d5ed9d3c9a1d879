"""A tiny random Stable Diffusion 3 pipeline (MMDiT + two CLIPs + optional T5 + VAE), saved as users have theirs."""

from __future__ import annotations

from pathlib import Path

import torch

from sdo_lightning.testing.tiny_models import build_tiny_t5_tokenizer, build_tiny_tokenizer

#: SD3's VAE factors (stabilityai/stable-diffusion-3-medium, vae/config.json)
SCALING_FACTOR, SHIFT_FACTOR = 1.5305, 0.0609


def _clip(hidden: int, vocab: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=3,
        projection_dim=32, vocab_size=vocab, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    ))


def build_tiny_sd3(root: Path, t5: bool = True, dynamic_shifting: bool = False, seed: int = 0) -> Path:
    """A tiny SD3-shaped pipeline in ``root``.

    The transformer is the one diffusers' SD3 pipeline tests use, with patch size 2 as the real
    models have (patch 1 would hide a missing division by the patch size), and two blocks, the
    first with SD3.5-medium's second attention (``attn2``) and both with its RMS q/k norm (one
    block would have no ``to_add_out``: the last block is context-pre-only). The two CLIPs
    have different widths (8 + 16 = 24 < T5's 32), so their concatenation is padded to T5's
    width as in the real models (768 + 1280 < 4096). ``t5=False`` saves the pipeline without
    ``text_encoder_3`` / ``tokenizer_3``. ``dynamic_shifting`` sets the scheduler's
    ``use_dynamic_shifting``; otherwise it has SD3.5's static ``shift: 3.0``.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, vocab = build_tiny_tokenizer(root / "_tok")
    tokenizer_2, _ = build_tiny_tokenizer(root / "_tok2")
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    text_encoder, text_encoder_2 = _clip(8, vocab), _clip(16, vocab)
    text_encoder_3 = tokenizer_3 = None
    if t5:
        tokenizer_3, t5_vocab = build_tiny_t5_tokenizer(root / "_tok3", max_length=512)
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ))
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR,
    )
    scheduler = (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True) if dynamic_shifting
                 else FlowMatchEulerDiscreteScheduler(shift=3.0))
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    ).save_pretrained(root)
    return root
