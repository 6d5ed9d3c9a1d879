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


def build_tiny_clip(root: Path, seed: int = 0, vision_layers: int = 2, text_layers: int = 2, image_size: int = 32,
                    patch_size: int = 8) -> Path:
    """A tiny random transformers CLIPModel with its tokenizer, saved in ``root``."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tokenizer, vocab = build_tiny_tokenizer(root)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=text_layers,
                         vocab_size=vocab, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                           num_hidden_layers=vision_layers, image_size=image_size, patch_size=patch_size),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def build_tiny_t5_tokenizer(root: Path, max_length: int = 120):
    """A character-level T5-style fast tokenizer built with the ``tokenizers`` library.

    Real PixArt repos ship a sentencepiece ``spiece.model``; this one is a ``tokenizer.json``
    (Unigram pieces, ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, ``</s>`` appended), which loads
    without sentencepiece.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for c in string.ascii_lowercase + string.digits + ".,!?'-":
        pieces += [(c, -3.0), ("\u2581" + c, -2.5)]
    tok = Tokenizer(Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)
    return fast, len(pieces)


def build_tiny_pixart(root: Path, additional_conditions: bool = False, seed: int = 0) -> Path:
    """A tiny PixArt-alpha-shaped pipeline (transformer with learned sigma + T5 encoder + VAE) in ``root``.

    ``additional_conditions`` gives the transformer the resolution / aspect-ratio embedding of
    the 1024px models.
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, vocab = build_tiny_t5_tokenizer(root / "_tok")
    transformer = PixArtTransformer2DModel(
        # inner dim 2 x 12 = 24: the size embedding of the 1024px models takes a third of it each
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=24, caption_channels=24, sample_size=8, patch_size=2,
        use_additional_conditions=additional_conditions,
    )
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=24, d_kv=8, d_ff=32, num_layers=2, num_heads=3,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )
    # PixArt's own scheduler; learned-sigma checkpoints may declare variance_type, which the
    # backbone must not hand on (it returns the epsilon half only).
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                            variance_type="learned_range")
    PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler).save_pretrained(root)
    return root


def build_tiny_ddpm(root: Path, num_class_embeds: int | None = None, flat: bool = False, seed: int = 0) -> Path:
    """A tiny pixel-space DDPM pipeline (``UNet2DModel`` + ``DDPMScheduler``) in ``root``.

    ``flat`` writes the UNet and scheduler configs at the top level instead of in ``unet/`` and
    ``scheduler/`` (the layout of a lone ``unet.save_pretrained(root)``).
    """
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4, num_class_embeds=num_class_embeds,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    if flat:
        unet.save_pretrained(root)
        scheduler.save_pretrained(root)
    else:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root)
    return root
