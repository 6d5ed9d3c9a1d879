"""The models benchmarks/gradient_cost.py measures: the project's real backbones around diffusers
pipelines built in memory with random weights from the published configs (nothing is downloaded).

Each builder returns a :class:`Case`: the backbone (which owns conditioning, classifier-free
guidance, the VAE decode and its scaling factor), the conditioning of one sample, and the
benchmark's scalar objective of the decoded images.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from sdo_lightning.backbones import Backbone

LORA_RANK = 4
#: each latent family's native latent side (--sd-latent-size's default): 512 px for SD-1.5 and
#: PixArt-XL-2-512, 1024 px for SDXL, SD3 and FLUX.1
NATIVE_LATENT = {"sd15": 64, "pixart": 64, "sdxl": 128, "sd3": 128, "flux": 128}
#: the LoRA target of tiny, sd15, pixart and sdxl (embedded: DigitsBackbone.lora_target_modules, which adds
#: conv1/conv2; sd3/flux: their backbones' lora_target_modules, which add the text stream's projections)
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPT = "a photograph of an astronaut riding a horse"

TINY_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                  "prediction_type": "epsilon", "clip_sample": False}
# stable-diffusion-v1-5's scheduler/scheduler_config.json, a PNDMScheduler (its clip_sample: false is no
# PNDM argument; the solvers set it); the solvers take the betas from it
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1}
# PixArt-XL-2-512x512's scheduler: a DPMSolverMultistepScheduler, linear betas (the rest diffusers' defaults)
PIXART_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                    "prediction_type": "epsilon", "algorithm_type": "dpmsolver++", "solver_order": 2}


@dataclass
class Case:
    """One backbone under measurement."""

    name: str
    backbone: Backbone
    cond: Any
    #: (1, C, H, W): one start latent
    latent_shape: tuple[int, ...]
    #: decoded images in [0, 1] -> scalar
    image_objective: Callable[[Tensor], Tensor]
    #: the weights a ``parameters`` target trains
    trainable: list[nn.Parameter]
    #: layer names a ``lora`` target adapts (peft ``target_modules``)
    lora_modules: list[str]
    lora_params: list[nn.Parameter] | None = None
    folding: Any = None

    @property
    def network(self) -> nn.Module:
        return self.backbone.network

    def objective(self, x0: Tensor) -> Tensor:
        """The scalar of one trajectory's x_0, through the backbone's decode (VAE included)."""
        return self.image_objective(self.backbone.decode(x0))


def _weighted_mean(shape: tuple[int, ...], device: torch.device, seed: int) -> Callable[[Tensor], Tensor]:
    """mean(image * fixed random weights)."""
    weights = torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(seed))
    return lambda images: (images.float() * weights).mean()


def _to(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    # nn.Module.to: diffusers' own .to(dtype) warns about from_pretrained, which is not used here
    return nn.Module.to(module, device=device, dtype=dtype).eval()


def _attention_weights(network: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in network.named_parameters()
            if (".attn1." in name or ".attn2." in name)
            and name.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))]


def _tokenizers() -> Any:
    """sdo_lightning.testing.tiny_models: a character-level CLIP tokenizer and T5-style tokenizer built offline."""
    from sdo_lightning.testing import tiny_models

    return tiny_models


def build_tiny(device: torch.device, seed: int, **speed: Any) -> Case:
    """A small ``UNet2DModel`` (3x16x16, channels (32, 64), one attention block) in a DDPMPipeline."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from sdo_lightning.backbones import PixelUNetBackbone

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).to(device).eval()
    backbone = PixelUNetBackbone.from_pipeline(DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**TINY_SCHEDULER)),
                                               **speed)
    shape = (1, *backbone.latent_shape)
    cond = backbone.encode_condition({"sample": torch.zeros(1)})  # unconditional: an empty per-sample tensor
    return Case("tiny", backbone, cond, shape, _weighted_mean(shape, device, seed + 1), list(unet.parameters()),
                list(ATTENTION))


def build_embedded(device: torch.device, seed: int, **speed: Any) -> Case:
    """The shipped digits model, unconditional, with the quickstart's classifier (log p(7))."""
    from sdo_lightning.backbones import DigitsBackbone
    from sdo_lightning.objectives import ClassifierObjective

    backbone = DigitsBackbone(**speed).to(device)
    classifier = ClassifierObjective(target_class=7).to(device)
    cond = torch.full((1,), DigitsBackbone.NULL_CLASS, dtype=torch.long, device=device)
    modules = list(DigitsBackbone.lora_target_modules)
    trainable = [p for name, p in backbone.unet.named_parameters()
                 if name.endswith(tuple(f"{m}.weight" for m in modules))]
    return Case("embedded", backbone, cond, (1, *backbone.latent_shape), lambda images: classifier(images, {}).sum(),
                trainable, modules)


def _vae(small: bool) -> nn.Module:
    """SD's AutoencoderKL (stable-diffusion-v1-5/vae, scaling factor 0.18215), or a 2-block one."""
    from diffusers import AutoencoderKL

    blocks = (8, 8) if small else (128, 256, 512, 512)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=blocks, layers_per_block=1 if small else 2,
        norm_num_groups=4 if small else 32, down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks), sample_size=512, scaling_factor=0.18215,
    )


def build_sd15(device: torch.device, seed: int, latent_size: int, guidance: float, small: bool = False,
               **speed: Any) -> Case:
    """StableDiffusionBackbone around an SD-1.5-sized pipeline (UNet2DConditionModel 860M, the SD VAE)
    with a one-layer random CLIP text encoder of width 768; ``small``: a test-sized pipeline."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdo_lightning.backbones import StableDiffusionBackbone

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    width = 16 if small else 768
    unet = UNet2DConditionModel(
        # sample_size only sets the backbone's latent shape (no weight depends on it)
        sample_size=latent_size, in_channels=4, out_channels=4, cross_attention_dim=width,
        **(dict(block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=2, norm_num_groups=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")) if small else
           dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)),
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, vocab = _tokenizers().build_tiny_tokenizer(Path(tmp))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=width, intermediate_size=64, num_attention_heads=2 if small else 12, num_hidden_layers=1,
        vocab_size=vocab, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    pipe = StableDiffusionPipeline(
        vae=_to(_vae(small), device, dtype), text_encoder=_to(text_encoder, device, dtype), tokenizer=tokenizer,
        unet=_to(unet, device, dtype), scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    backbone = StableDiffusionBackbone.from_pipeline(pipe, guidance_scale=guidance, **speed)
    shape = (1, *backbone.latent_shape)
    image = (1, 3, latent_size * backbone.vae_scale, latent_size * backbone.vae_scale)
    return Case("sd15", backbone, backbone.encode_condition({"prompt": [PROMPT]}), shape,
                _weighted_mean(image, device, seed + 1), _attention_weights(unet), list(ATTENTION))


def build_pixart(device: torch.device, seed: int, latent_size: int, guidance: float, small: bool = False,
                 **speed: Any) -> Case:
    """PixArtAlphaBackbone around a PixArt-XL-2-512-sized pipeline (28-block transformer of width 1152,
    learned sigma; the SD VAE) with a one-layer random T5 encoder of width 4096; ``small``: test-sized."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from sdo_lightning.backbones import PixArtAlphaBackbone

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    width = 24 if small else 4096  # T5's d_model = the transformer's caption_channels
    transformer = PixArtTransformer2DModel(
        in_channels=4, out_channels=8, patch_size=2, caption_channels=width, norm_type="ada_norm_single",
        use_additional_conditions=False,
        **(dict(sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24)
           if small else
           dict(sample_size=64, num_layers=28, num_attention_heads=16, attention_head_dim=72,
                cross_attention_dim=1152)),
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, vocab = _tokenizers().build_tiny_t5_tokenizer(Path(tmp))
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=width, d_kv=8 if small else 64, d_ff=64, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=_to(text_encoder, device, dtype), vae=_to(_vae(small), device, dtype),
        transformer=_to(transformer, device, dtype), scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER),
    )
    side = latent_size * pipe.vae_scale_factor
    backbone = PixArtAlphaBackbone.from_pipeline(pipe, guidance_scale=guidance, height=side, width=side, **speed)
    return Case("pixart", backbone, backbone.encode_condition({"prompt": [PROMPT]}), (1, *backbone.latent_shape),
                _weighted_mean((1, 3, side, side), device, seed + 1), _attention_weights(transformer),
                list(ATTENTION))


def add_adapters(case: Case, seed: int) -> None:
    """A rank-4 LoRA on ``case.lora_modules`` with small random B (so the adapters act), folding ready."""
    from sdo_lightning.lora import AdapterFolding, add_lora

    case.lora_params = add_lora(case.network, LORA_RANK, LORA_RANK, case.lora_modules)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in case.lora_params:
            p.copy_(0.01 * torch.randn(p.shape, generator=gen))
    case.folding = AdapterFolding(case.network)
    set_adapters(case, "off")


def set_adapters(case: Case, state: str) -> None:
    """``off``: base model only (the floor); ``plain``: peft layers in every call; ``folded``:
    adapters folded into weight copies for no-grad calls (after a refresh)."""
    if case.folding is None:
        return
    case.folding.fold(False)
    for layer in case.folding.layers:
        layer._disable_adapters = state == "off"
    if state == "folded":
        case.folding.refresh()


def cli_parts(args: list[str]) -> tuple[Any, Any]:
    """The module and data module ``sdo fit`` builds from ``args`` (``--config ...`` and overrides),
    without fitting: the CLI's trainer is built, and not used, in a scratch directory, and the
    calling script's own command line is not read as the CLI's."""
    import os

    from sdo_lightning.cli import main

    cwd, argv = os.getcwd(), sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        sys.argv = argv[:1]
        try:
            cli = main(args, run=False)
        finally:
            os.chdir(cwd)
            sys.argv = argv
    return cli.model, cli.datamodule
