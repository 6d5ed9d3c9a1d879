"""Backbones: a diffusion model behind one small interface the LightningModules use.

A backbone loads the networks, turns a batch into conditioning, denoises (guidance included),
decodes latents to images in [0, 1] and encodes images back. It owns no optimization.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdo_lightning._hub import offline


class Backbone(nn.Module, abc.ABC):
    """The interface between a diffusion model and the optimization code.

    Attributes:
        scheduler_config: the model's training noise schedule (a diffusers scheduler config),
            handed to every :class:`~sdo_lightning.Solver`.
        latent_shape: ``(C, H, W)`` of one latent.
    """

    scheduler_config: dict[str, Any]
    latent_shape: tuple[int, int, int]
    #: layer names LoRA adapts by default (peft ``target_modules``)
    lora_target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]

    @property
    @abc.abstractmethod
    def network(self) -> nn.Module:
        """The denoising network (UNet or transformer) that fine-tuning adapts."""

    @abc.abstractmethod
    def encode_condition(self, batch: dict[str, Any]) -> Any:
        """Conditioning for ``denoise`` from a batch (class labels, prompts, ...)."""

    def condition_embedding(self, cond: Any) -> Tensor | None:
        """A float embedding of ``cond`` that can be optimized, or None when there is none."""
        return None

    def with_embedding(self, cond: Any, embedding: Tensor) -> Any:
        """``cond`` with its embedding replaced by ``embedding`` (an optimized one)."""
        return embedding

    @abc.abstractmethod
    def denoise(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        """The network output at ``(x, t)``, with classifier-free guidance where configured."""

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` in ``[0, 1]`` from latents (differentiable)."""

    @abc.abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Latents from images in ``[0, 1]`` (for inversion of real images)."""

    def save_lora(self, directory: str | Path) -> Path:
        """Write the network's LoRA adapter; peft's layout unless a backbone has a better one."""
        from sdo_lightning.lora import save_adapter

        return save_adapter(self.network, directory)


def _speed_up(network: nn.Module, compile: bool | str, channels_last: bool) -> None:
    """Optional speed-ups of the denoiser, in place (state-dict keys unchanged)."""
    if channels_last:
        network.to(memory_format=torch.channels_last)
    if compile:
        # nn.Module.compile compiles forward in place; a string names the torch.compile backend.
        network.compile(**({} if compile is True else {"backend": compile}))


class _LookupOrPass(nn.Embedding):
    """An ``nn.Embedding`` that also accepts ready embeddings: float input passes through.

    Lets a class-conditional UNet take an optimized class embedding in place of a label while
    its state-dict keys stay those of the original embedding.
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Embedding's name
        if input.is_floating_point():
            return input
        return super().forward(input)


_offline = offline  # ``local_files_only`` as given, or implied by ``HF_HUB_OFFLINE``


def _load_failed(what: str, model: str, err: Exception) -> FileNotFoundError:
    """One sentence for a model that did not load: a local path that holds no pipeline, or a hub
    id that is neither cached nor reachable."""
    local = (model.startswith((".", "~")) or Path(model).is_absolute() or model.count("/") > 1
             or Path(model).expanduser().exists())
    if local:
        how = ("no diffusers pipeline is there: check the path, or download one into it with "
               f"`hf download <hub id> --local-dir {model}`")
    else:
        how = (f"it is not in the local cache and could not be fetched from the hub (offline, or no such repository): "
               f"fetch it with network access (`hf download {model}`) or give a local pipeline directory")
    # the first clause of the original message, so the whole error stays one sentence
    detail = (str(err).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")[:200]
    return FileNotFoundError(f"could not load the {what} from {model!r} ({type(err).__name__}: {detail}); {how}.")


def _from_subfolder_or_root(load: Any, model: str, subfolder: str, **kwargs: Any) -> Any:
    """``load(model, subfolder=...)``, falling back to the top level of ``model`` (a lone
    ``save_pretrained`` layout); the subfolder's error is the one raised when both fail."""
    try:
        return load(model, subfolder=subfolder, **kwargs)
    except OSError as first:
        try:
            return load(model, **kwargs)
        except OSError:
            raise first from None


def _epsilon_only(scheduler_config: dict[str, Any]) -> dict[str, Any]:
    """The scheduler config for a denoiser that returns epsilon only.

    Learned-sigma models declare ``variance_type: learned(_range)``; diffusers schedulers then
    read the first 3 channels (DPM-Solver) or split the output in two (DDPM). The backbones hand
    on the epsilon half alone, so the variance type must not reach the solver.
    """
    config = dict(scheduler_config)
    if config.get("variance_type") in ("learned", "learned_range"):
        del config["variance_type"]
    return config


def _epsilon_half(out: Tensor, channels: int) -> Tensor:
    """The epsilon half of a learned-sigma output (``2 * channels`` channels: epsilon, variance)."""
    return out[:, :channels] if out.shape[1] == 2 * channels else out


def _unit_range(images: Tensor) -> Tensor:
    # Clamped to [0, 1] in the forward pass only: a plain clamp would give no gradient to the
    # many pixels just outside [0, 1], so an objective could never move them back in.
    return images + (images.clamp(0, 1) - images).detach()


def _vae_decode(vae: nn.Module, latents: Tensor) -> Tensor:
    """Images in [0, 1] from the diffusion model's scaled latents, differentiably."""
    cfg = vae.config
    z = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    images = vae.decode(z.to(vae.dtype)).sample.to(latents.dtype)
    return _unit_range((images + 1) / 2)


def _vae_encode(vae: nn.Module, images: Tensor) -> Tensor:
    """The diffusion model's scaled latents (posterior mean) of images in [0, 1]."""
    cfg = vae.config
    mean = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.mean.to(images.dtype)
    return (mean - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor


class PixelUNetBackbone(Backbone):
    """A pixel-space diffusers ``UNet2DModel``: DDPM/DDIM pipelines such as ``google/ddpm-cifar10-32``.

    Unconditional, or class-conditional when the UNet has ``num_class_embeds``: then each
    sample's class comes from ``batch["class_label"]``. The UNet works on images in [-1, 1];
    decoding maps them to [0, 1]. A learned-sigma UNet (twice the input channels out) is
    supported: its epsilon half is used.

    Args:
        model: a diffusers pipeline directory or hub id with ``unet/`` and ``scheduler/`` (or a
            directory with the UNet's and the scheduler's files at the top level).
        guidance_scale: classifier-free guidance scale (1 = none); needs ``null_class``.
        null_class: for a class-conditional UNet, the label it was trained with as "no class":
            used when the batch has no labels and as the unconditional branch of guidance.
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
        revision: the hub revision to load.
        variant: weights variant (e.g. ``fp16``).
        compile: ``torch.compile`` the UNet (True, or the name of a backend).
        channels_last: store the UNet's weights channels-last (faster convolutions on GPUs).
    """

    lora_target_modules = ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0"]

    def __init__(
        self,
        model: str,
        guidance_scale: float = 1.0,
        null_class: int | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
        variant: str | None = None,
        compile: bool | str = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        import diffusers
        from diffusers import DDPMScheduler, SchedulerMixin, UNet2DModel

        hub = {"local_files_only": _offline(local_files_only), "revision": revision}
        try:
            self.unet = _from_subfolder_or_root(UNet2DModel.from_pretrained, model, "unet", variant=variant, **hub)
            raw = _from_subfolder_or_root(DDPMScheduler.load_config, model, "scheduler", **hub)
        except (OSError, ValueError) as err:
            raise _load_failed("pixel-space UNet pipeline", model, err) from None
        self.unet.requires_grad_(False)
        old = self.unet.class_embedding
        self.class_conditional = old is not None
        if null_class is not None and not self.class_conditional:
            raise ValueError(
                f"the UNet in {model} is not class-conditional (num_class_embeds is unset); leave null_class unset."
            )
        if guidance_scale != 1.0 and null_class is None:
            raise ValueError(
                "classifier-free guidance needs a class-conditional UNet and its null_class (the label trained "
                "as 'no class'); set null_class, or guidance_scale: 1."
            )
        if type(old) is nn.Embedding:  # a label lookup (class_embed_type unset): accept optimized embeddings too
            new = _LookupOrPass(old.num_embeddings, old.embedding_dim)
            new.weight = old.weight
            self.unet.class_embedding = new
        # The model's own scheduler class fills the defaults its file leaves out, as a pipeline would.
        scheduler_cls = getattr(diffusers, str(raw.get("_class_name")), None)
        if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, SchedulerMixin)):
            scheduler_cls = DDPMScheduler
        self.scheduler_config = _epsilon_only(dict(scheduler_cls.from_config(raw).config))
        cfg = self.unet.config
        size = cfg.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (cfg.in_channels, height, width)
        self.guidance_scale = guidance_scale
        self.null_class = null_class
        _speed_up(self.unet, compile, channels_last)

    @property
    def network(self) -> nn.Module:
        return self.unet

    def encode_condition(self, batch: dict[str, Any]) -> Tensor:
        n = len(next(iter(v for v in batch.values() if isinstance(v, Tensor))))
        if not self.class_conditional:
            # nothing to condition on; an empty per-sample tensor indexes and moves like a label
            return torch.zeros(n, 0, device=self.unet.device)
        labels = batch.get("class_label")
        if labels is None:
            if self.null_class is None:
                raise KeyError(f"{type(self).__name__}: the UNet is class-conditional; give batch['class_label'] "
                               "(SampleSet(class_label=...)) or set null_class.")
            labels = torch.full((n,), self.null_class, dtype=torch.long)
        return torch.as_tensor(labels, dtype=torch.long, device=self.unet.device)

    def condition_embedding(self, cond: Tensor) -> Tensor | None:
        if not isinstance(self.unet.class_embedding, _LookupOrPass):
            return None
        return self.unet.class_embedding(cond).detach().clone()

    def denoise(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        model_in = x.to(self.unet.dtype)
        channels = x.shape[1]
        if not self.class_conditional:
            return _epsilon_half(self.unet(model_in, t).sample, channels).to(x.dtype)
        conditional = cond.is_floating_point() or bool((cond != self.null_class).any())
        if self.guidance_scale == 1.0 or not conditional:
            return _epsilon_half(self.unet(model_in, t, class_labels=cond).sample, channels).to(x.dtype)
        null = torch.full((len(x),), self.null_class, dtype=torch.long, device=x.device)
        if cond.is_floating_point():
            null = self.unet.class_embedding(null)
        both = self.unet(torch.cat([model_in, model_in]), t, class_labels=torch.cat([null, cond])).sample
        uncond, cond_out = _epsilon_half(both, channels).to(x.dtype).chunk(2)
        return uncond + self.guidance_scale * (cond_out - uncond)

    def decode(self, latents: Tensor) -> Tensor:
        # The UNet works on images scaled to [-1, 1]; the decoder is that affine map.
        return _unit_range((latents + 1) / 2)

    def encode(self, images: Tensor) -> Tensor:
        return images * 2 - 1


class DigitsBackbone(PixelUNetBackbone):
    """The embedded default: a small class-conditional pixel-space UNet trained on digits.

    Conditioning is a class label 0-9 per sample, or 10 for "no class" (unconditional).
    Without a ``path`` it loads the weights shipped inside the package.

    Args:
        path: a directory with ``unet/`` (diffusers ``UNet2DModel``) and ``scheduler/``, as the
            recipe ``python -m sdo_lightning.digits.train`` writes; None for the shipped weights.
        guidance_scale: classifier-free guidance scale for conditional samples (1 = none).
        compile: ``torch.compile`` the UNet (True, or the name of a backend).
        channels_last: store the UNet's weights channels-last (faster convolutions on GPUs).
    """

    NULL_CLASS = 10

    def __init__(
        self, path: str | None = None, guidance_scale: float = 1.0, compile: bool | str = False, channels_last: bool = False
    ) -> None:
        from sdo_lightning.digits import WEIGHTS_DIR

        root = Path(path) if path is not None else WEIGHTS_DIR
        if not (root / "unet" / "config.json").is_file():
            raise FileNotFoundError(
                f"no digits model in {root} (expected {root / 'unet' / 'config.json'}); train one with "
                f"`python -m sdo_lightning.digits.train --out {root}` or leave `path` unset for the shipped weights."
            )
        super().__init__(str(root), guidance_scale=guidance_scale, null_class=self.NULL_CLASS, local_files_only=True,
                         compile=compile, channels_last=channels_last)


@dataclass
class TextCondition:
    """Prompt embeddings and the negative-prompt embeddings classifier-free guidance needs.

    ``mask`` and ``negative_mask`` are the text encoder's attention masks ``(B, L)`` (1 = token,
    0 = padding) for models whose cross-attention skips padding (T5-conditioned ones); None
    where the model attends to every position (CLIP-conditioned Stable Diffusion).
    """

    embeds: Tensor
    negative_embeds: Tensor | None
    mask: Tensor | None = None
    negative_mask: Tensor | None = None

    def _map(self, fn: Any) -> "TextCondition":
        fields = (self.embeds, self.negative_embeds, self.mask, self.negative_mask)
        return TextCondition(*(None if v is None else fn(v) for v in fields))

    def __getitem__(self, index: Tensor) -> "TextCondition":
        return self._map(lambda v: v[index])

    def to(self, device: torch.device | str) -> "TextCondition":
        return self._map(lambda v: v.to(device))


class _TextConditioned(Backbone):
    """What the prompt-conditioned backbones share: prompts from the batch, and the prompt
    embeddings as the optimizable conditioning."""

    def _prompts(self, batch: dict[str, Any]) -> list[str]:
        prompts = batch.get("prompt")
        if prompts is None:
            raise KeyError(f"{type(self).__name__} needs batch['prompt'] (a list of strings); use a PromptSet "
                           "data module.")
        return [prompts] if isinstance(prompts, str) else list(prompts)

    def condition_embedding(self, cond: TextCondition) -> Tensor:
        return cond.embeds.detach().clone()

    def with_embedding(self, cond: TextCondition, embedding: Tensor) -> TextCondition:
        return replace(cond, embeds=embedding)


class StableDiffusionBackbone(_TextConditioned):
    """Stable Diffusion 1.x/2.x (UNet + CLIP text encoder + VAE), or an LCM-distilled SD UNet.

    Conditioning comes from ``batch["prompt"]`` (a list of strings). With ``guidance_scale > 1``
    the denoiser applies classifier-free guidance against ``negative_prompt``. For a UNet with a
    guidance embedding (LCM-distilled, ``time_cond_proj_dim`` set), the guidance scale is fed
    through that embedding instead, in one network call.

    Args:
        model: a diffusers pipeline directory or hub id (e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``).
        guidance_scale: classifier-free guidance scale (1 = none).
        negative_prompt: the prompt guidance pushes away from.
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
        revision: the hub revision to load.
        variant: weights variant (e.g. ``fp16``).
        lora: optional LoRA weights (a directory or file in diffusers' format, e.g. LCM-LoRA)
            fused into the UNet after loading.
        compile: ``torch.compile`` the UNet (True, or the name of a backend).
        channels_last: store the UNet's weights channels-last (faster convolutions on GPUs).
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
    ) -> None:
        super().__init__()
        from diffusers import StableDiffusionPipeline

        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                model, safety_checker=None, requires_safety_checker=False, local_files_only=_offline(local_files_only),
                revision=revision, variant=variant,
            )
        except (OSError, ValueError) as err:
            raise _load_failed("Stable Diffusion pipeline", model, err) from None
        if lora is not None:
            pipe.load_lora_weights(lora, local_files_only=_offline(local_files_only))
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        self.scheduler_config = dict(pipe.scheduler.config)
        self.vae_scale = pipe.vae_scale_factor
        size = self.unet.config.sample_size
        self.latent_shape = (self.unet.config.in_channels, size, size)
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.lora = lora  # e.g. an LCM-LoRA fused at load time (the solver check reads it)
        self.guidance_embedding = self.unet.config.time_cond_proj_dim is not None
        _speed_up(self.unet, compile, channels_last)

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
        prompts = self._prompts(batch)
        embeds = self._embed(prompts)
        negative = None
        if self.guidance_scale != 1.0 and not self.guidance_embedding:
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
        out = self.unet(torch.cat([model_in, model_in]), t, encoder_hidden_states=both).sample.to(x.dtype)
        uncond, text = out.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)

    def decode(self, latents: Tensor) -> Tensor:
        return _vae_decode(self.vae, latents)

    def encode(self, images: Tensor) -> Tensor:
        return _vae_encode(self.vae, images)

    def save_lora(self, directory: str | Path) -> Path:
        """Write the UNet adapter in diffusers' format: ``pipeline.load_lora_weights(directory)``."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        from sdo_lightning.lora import lora_state_dict

        directory = Path(directory)
        layers = convert_state_dict_to_diffusers(lora_state_dict(self.unet))
        # the metadata carries lora_alpha: without it diffusers loads the adapter at alpha = rank
        StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers,
                                                  unet_lora_adapter_metadata=self.unet._sdo_lora_config.to_dict())
        return directory


def _load_t5_tokenizer(model: str, **hub: Any) -> Any:
    """The pipeline's tokenizer through transformers' Auto classes: a ``tokenizer.json`` loads as
    it is; a sentencepiece ``spiece.model`` (what real PixArt repos ship) needs sentencepiece."""
    from importlib.util import find_spec

    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, subfolder="tokenizer", **hub)
    except OSError as err:
        raise _load_failed("PixArt-alpha pipeline", model, err) from None
    except (ImportError, ValueError) as err:
        # Without sentencepiece, transformers fails on spiece.model with a misleading error (it
        # falls back to reading the file as a tiktoken vocabulary).
        if find_spec("sentencepiece") is None:
            raise ImportError(
                f"the tokenizer of {model!r} is a sentencepiece model, which needs the sentencepiece package: "
                "`pip install sentencepiece`."
            ) from err
        raise


class PixArtAlphaBackbone(_TextConditioned):
    """PixArt-alpha (a DiT: ``PixArtTransformer2DModel`` + T5 text encoder + VAE).

    Conditioning comes from ``batch["prompt"]`` (a list of strings), encoded by T5 into
    ``max_sequence_length`` tokens with their attention mask (the transformer's cross-attention
    skips padding). With ``guidance_scale > 1`` the denoiser applies classifier-free guidance
    against ``negative_prompt``. The transformer predicts epsilon and a learned variance; the
    denoiser returns the epsilon half. Models with resolution / aspect-ratio conditioning (the
    1024px ones) receive the sampled image size.

    Args:
        model: a diffusers pipeline directory or hub id (e.g. ``PixArt-alpha/PixArt-XL-2-512x512``).
        guidance_scale: classifier-free guidance scale (1 = none).
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
    ) -> None:
        super().__init__()
        from diffusers import PixArtAlphaPipeline

        hub = {"local_files_only": _offline(local_files_only), "revision": revision}
        torch_dtype = getattr(torch, dtype, None) if dtype is not None else None
        if dtype is not None and not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. bfloat16, float16 or float32.")
        tokenizer = _load_t5_tokenizer(model, **hub)
        try:
            pipe = PixArtAlphaPipeline.from_pretrained(model, tokenizer=tokenizer, variant=variant,
                                                       **({"torch_dtype": torch_dtype} if torch_dtype else {}), **hub)
        except (OSError, ValueError) as err:
            raise _load_failed("PixArt-alpha pipeline", model, err) from None
        self.transformer, self.vae, self.text_encoder = pipe.transformer, pipe.vae, pipe.text_encoder
        self.tokenizer = tokenizer
        for module in (self.transformer, self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        self.scheduler_config = _epsilon_only(dict(pipe.scheduler.config))
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
        _speed_up(self.transformer, compile, channels_last)

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
        prompts = self._prompts(batch)
        embeds, mask = self._embed(prompts)
        negative = negative_mask = None
        if self.guidance_scale != 1.0:
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
        out = _epsilon_half(out, x.shape[1]).to(x.dtype)
        if not guided:
            return out
        uncond, text = out.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)

    def decode(self, latents: Tensor) -> Tensor:
        return _vae_decode(self.vae, latents)

    def encode(self, images: Tensor) -> Tensor:
        return _vae_encode(self.vae, images)
