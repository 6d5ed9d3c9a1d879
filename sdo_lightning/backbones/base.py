"""The :class:`Backbone` contract, and the base of the prompt-conditioned backbones.

A backbone puts a diffusion model behind one small interface the LightningModules use: it
loads the networks, turns a batch into conditioning, denoises (guidance included), decodes
latents to images in [0, 1] and encodes images back. It owns no optimization. Defining
(importing) a concrete subclass registers it under its class name, like the other plugins.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sdo_lightning import registry


class Backbone(nn.Module, abc.ABC):
    """The interface between a diffusion model and the optimization code.

    Everything the LightningModules, the sampling loop and the diagnostics ask of a model is
    declared here; a new model family implements the abstract methods and sets the attributes.

    Attributes:
        scheduler_config: the model's training noise schedule (a diffusers scheduler config),
            handed to every :class:`~sdo_lightning.Solver`. A family whose pipeline calls
            ``set_timesteps`` with more than the step count adds what it passes under
            ``"sdo_set_timesteps"``: ``{"mu": float}`` (dynamic shifting, from the image sequence
            length) and/or ``{"sigmas": "linspace"}`` (sigmas ``linspace(1, 1/N, N)``, as FLUX's
            pipeline gives them).
        latent_shape: ``(C, H, W)`` of one latent.
        lora_target_modules: layer names LoRA adapts by default (peft ``target_modules``).
        fused_lora: the LoRA weights fused into the network at load time (e.g. an LCM-LoRA), or
            None; the solver check reads it.
        decode_clamp: how ``decode`` clamps images to [0, 1]: ``straight_through`` (default:
            clamped values, the gradient passed as if unclamped, see :func:`unit_range`) or
            ``hard`` (``torch.clamp``: no gradient to pixels outside, as the authors' released
            scripts do); ``LatentOptimization(decode_clamp=...)`` sets it.
    """

    scheduler_config: dict[str, Any]
    latent_shape: tuple[int, int, int]
    lora_target_modules: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0"]
    fused_lora: str | None = None
    decode_clamp: str = "straight_through"

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            registry.register("backbones", cls)

    @classmethod
    def from_pipeline(cls, pipe: Any, **options: Any) -> "Backbone":
        """A backbone around an already built diffusers pipeline (random weights for a benchmark,
        a pipeline a notebook holds), without loading anything.

        ``options`` are the constructor's arguments that do not concern loading (e.g.
        ``guidance_scale``, ``checkpoint_decode``); the others keep the constructor's defaults. Families that support it
        implement ``_adopt(pipe, **options)``, which the constructor calls after loading.
        """
        adopt = getattr(cls, "_adopt", None)
        if adopt is None:
            raise TypeError(f"{cls.__name__} does not support from_pipeline; construct it with a model path.")
        accepted = [n for n in inspect.signature(adopt).parameters if n not in ("self", "pipe")]
        checkpoint_decode = options.pop("checkpoint_decode", False) if issubclass(cls, TextConditionedBackbone) else False
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pipeline: unknown options {unknown}; accepted: {accepted}.")
        defaults = inspect.signature(cls.__init__).parameters
        merged = {n: options[n] if n in options else defaults[n].default for n in accepted}
        backbone = cls.__new__(cls)
        nn.Module.__init__(backbone)
        backbone._adopt(pipe, **merged)
        if checkpoint_decode:
            backbone.checkpoint_decode = True
        return backbone

    @property
    @abc.abstractmethod
    def network(self) -> nn.Module:
        """The denoising network (UNet or transformer) that fine-tuning adapts."""

    @property
    def lcm_distilled(self) -> bool:
        """True for a model distilled for LCM sampling (its scheduler is an ``LCMScheduler``, or
        it has a guidance embedding); an LCM-LoRA fused at load time shows in ``fused_lora``."""
        return str(self.scheduler_config.get("_class_name", "")) == "LCMScheduler"

    @property
    def flow_matching(self) -> bool:
        """True for a rectified-flow model (its scheduler is a ``FlowMatch*`` one): it predicts a
        velocity and samples with :class:`~sdo_lightning.solvers.FlowMatchEuler`."""
        return str(self.scheduler_config.get("_class_name", "")).startswith("FlowMatch")

    @abc.abstractmethod
    def encode_condition(self, batch: dict[str, Any]) -> Any:
        """Conditioning for ``denoise`` from a batch (class labels, prompts, ...): a tensor with one
        row per sample, or an object with ``__getitem__`` (rows) and ``to(device)``."""

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


def row_timesteps(t: Tensor, rows: int) -> Tensor:
    """``t`` for a network input of ``rows`` rows: a scalar (or one timestep per row) as it is; one
    timestep per sample of a batch the guidance repeated (``[x; x]``), repeated the same way."""
    t = torch.as_tensor(t)
    if t.dim() == 0 or t.numel() in (1, rows):
        return t
    return t.reshape(-1).repeat(rows // t.numel())


def unit_range(images: Tensor, hard: bool = False) -> Tensor:
    """``images`` clamped to [0, 1] in the forward pass only (or, ``hard``, a plain clamp).

    A plain clamp would give no gradient to the many pixels just outside [0, 1], so an
    objective could never move them back in.
    """
    if hard:
        return images.clamp(0, 1)
    return images + (images.clamp(0, 1) - images).detach()


def vae_decode(vae: nn.Module, latents: Tensor, hard_clamp: bool = False) -> Tensor:
    """Images in [0, 1] from the diffusion model's scaled latents, differentiably (see
    :func:`unit_range` for the clamp)."""
    cfg = vae.config
    z = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    images = vae.decode(z.to(vae.dtype)).sample.to(latents.dtype)
    return unit_range((images + 1) / 2, hard_clamp)


def vae_encode(vae: nn.Module, images: Tensor) -> Tensor:
    """The diffusion model's scaled latents (posterior mean) of images in [0, 1]."""
    cfg = vae.config
    mean = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.mean.to(images.dtype)
    return (mean - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor


def speed_up(network: nn.Module, compile: bool | str, channels_last: bool) -> None:
    """Optional speed-ups of the denoiser, in place (state-dict keys unchanged)."""
    if channels_last:
        network.to(memory_format=torch.channels_last)
    if compile:
        # nn.Module.compile compiles forward in place; a string names the torch.compile backend.
        network.compile(**({} if compile is True else {"backend": compile}))


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
        return type(self)(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                             for f in fields(self)})

    def __getitem__(self, index: Tensor) -> "TextCondition":
        return self._map(lambda v: v[index])

    def to(self, device: torch.device | str) -> "TextCondition":
        return self._map(lambda v: v.to(device))


@dataclass
class PooledTextCondition(TextCondition):
    """:class:`TextCondition` plus a pooled prompt embedding ``(B, P)`` (and its negative) that
    the denoiser reads beside the token sequence (SDXL, SD3, FLUX)."""

    pooled: Tensor | None = None
    negative_pooled: Tensor | None = None


def apply_guidance(out: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance of a batched output ``[unconditional; conditional]``:
    ``uncond + scale * (cond - uncond)``."""
    uncond, cond = out.chunk(2)
    return uncond + scale * (cond - uncond)


class TextConditionedBackbone(Backbone):
    """The base of prompt-conditioned latent backbones: prompts from ``batch["prompt"]``, the
    prompt embeddings (:class:`TextCondition`) as the optimizable conditioning, and decoding and
    encoding with the family's VAE (``self.vae``).

    Attributes:
        checkpoint_decode: decode under activation checkpointing when the latents carry a graph:
            the decoder's activations are recomputed in backward instead of held (every family's
            ``checkpoint_decode`` option).
    """

    checkpoint_decode: bool = False

    def prompts(self, batch: dict[str, Any]) -> list[str]:
        """The batch's prompts, one per sample."""
        prompts = batch.get("prompt")
        if prompts is None:
            raise KeyError(f"{type(self).__name__} needs batch['prompt'] (a list of strings); use a PromptSet "
                           "data module.")
        return [prompts] if isinstance(prompts, str) else list(prompts)

    def condition_embedding(self, cond: TextCondition) -> Tensor:
        return cond.embeds.detach().clone()

    def with_embedding(self, cond: TextCondition, embedding: Tensor) -> TextCondition:
        return replace(cond, embeds=embedding)

    def decode(self, latents: Tensor) -> Tensor:
        hard = self.decode_clamp == "hard"
        if self.checkpoint_decode and torch.is_grad_enabled() and latents.requires_grad:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(vae_decode, self.vae, latents, hard, use_reentrant=False)
        return vae_decode(self.vae, latents, hard)

    def encode(self, images: Tensor) -> Tensor:
        return vae_encode(self.vae, images)


class PooledTextConditionedBackbone(TextConditionedBackbone):
    """Prompt-conditioned backbones whose condition is a :class:`PooledTextCondition`: the
    optimizable embedding is each sample's token sequence (flattened) and pooled embedding in
    one row ``(B, L * D + P)``."""

    def condition_embedding(self, cond: PooledTextCondition) -> Tensor:
        return torch.cat([cond.embeds.flatten(1), cond.pooled.to(cond.embeds.dtype)], dim=1).detach().clone()

    def with_embedding(self, cond: PooledTextCondition, embedding: Tensor) -> PooledTextCondition:
        length, dim = cond.embeds.shape[1:]
        size = length * dim + cond.pooled.shape[1]
        if embedding.shape[1:] != (size,):
            raise ValueError(f"the {type(self).__name__} prompt embedding must have shape (B, {size}) (sequence "
                             f"{length}x{dim} then pooled), got {tuple(embedding.shape)}.")
        sequence, pooled = embedding.split([length * dim, size - length * dim], dim=1)
        return replace(cond, embeds=sequence.reshape(-1, length, dim), pooled=pooled)
