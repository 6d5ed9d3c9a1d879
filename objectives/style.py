"""Style loss: Gram matrices of CLIP vision features against a reference style image (paper Eq. 24)."""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import Tensor

from sdo_lightning.contracts import Objective
from sdo_lightning.objectives._inputs import (
    as_rgb,
    image_like,
    load_image,
    normalize,
    offline_default,
    plain_resize,
    resize_center_crop,
)
from sdo_lightning.objectives.clip import CLIP_MEAN, CLIP_STD


def gram(tokens: Tensor) -> Tensor:
    """``F^T F / N`` of token features ``F`` ``(B, N, D)``: a ``(B, D, D)`` Gram matrix per sample."""
    return tokens.transpose(1, 2) @ tokens / tokens.shape[1]


class CLIPStyleLoss(Objective):
    """``|| G_j(x) - G_j(x_ref) ||_F^2`` per sample, G_j the Gram matrix of CLIP vision layer ``j``.

    The features are the patch tokens (the class token left out) of the hidden state after
    encoder layer ``layer`` of a CLIP vision tower; the Gram matrix over the ``N`` patch tokens
    is divided by ``N``. The reference image is read once (PIL, outside the graph) and its Gram
    matrix cached. Preprocessing is tensor-only: grayscale to RGB, bicubic resize of the short
    side and center crop to the tower's input size, CLIP normalization.

    Args:
        model: a transformers ``CLIPModel`` or ``CLIPVisionModel`` directory or hub id
            (e.g. ``openai/clip-vit-large-patch14``).
        reference: the style image: a PNG/JPG file, or an ``.npz``/``.pt`` tensor in [0, 1].
        layer: which hidden state: 0 is the patch embedding, ``j`` the output of encoder layer
            ``j``. The paper uses the third layer.
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
        gram: ``per_token``: ``F^T F / N`` (default); ``sum``: ``F^T F``, as the authors'
            released style script computes it.
        reduction: ``sum`` of the squared differences of the Gram entries (Eq. 24's squared
            Frobenius norm, default) or their ``mean`` (the released script). ``sum``/``mean``
            and ``gram: sum`` together give ``N^2 / D^2`` times the default loss (N patch
            tokens, D channels: 0.065 for ViT-B/16 at 224 px); Adam steps barely change with a
            constant factor, an SGD step does.
        resize: ``processor``: antialiased bicubic resize of the short side and center crop;
            ``bicubic`` or ``bilinear``: a plain ``F.interpolate`` of the whole image to the
            tower's size, without antialiasing (the released script: ``bicubic``).
    """

    def __init__(
        self,
        model: str,
        reference: str | os.PathLike,
        layer: int = 3,
        local_files_only: bool | None = None,
        gram: Literal["per_token", "sum"] = "per_token",
        reduction: Literal["sum", "mean"] = "sum",
        resize: Literal["processor", "bilinear", "bicubic"] = "processor",
    ) -> None:
        super().__init__()
        from transformers import CLIPVisionModel

        if gram not in ("per_token", "sum") or reduction not in ("sum", "mean") or \
                resize not in ("processor", "bilinear", "bicubic"):
            raise ValueError(f"CLIPStyleLoss takes gram 'per_token' or 'sum', reduction 'sum' or 'mean' and resize "
                             f"'processor', 'bilinear' or 'bicubic'; got {gram!r}, {reduction!r}, {resize!r}.")
        self.gram_kind, self.reduction, self.resize_mode = gram, reduction, resize
        from transformers.utils import logging as hf_logging

        self.register_buffer("reference", load_image(reference, "style reference image"), persistent=False)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a CLIPModel directory loads with its text tower reported as unused
        try:
            self.vision = CLIPVisionModel.from_pretrained(model, local_files_only=offline_default(local_files_only))
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"could not load a CLIP vision model from {model!r} ({type(err).__name__}); give a local directory or "
                f"a hub id with network access (e.g. fetch it first with `hf download {model}`)."
            ) from None
        finally:
            hf_logging.set_verbosity(verbosity)
        depth = self.vision.config.num_hidden_layers
        if not 0 <= layer <= depth:
            raise ValueError(f"layer={layer} is not a hidden state of {model!r}, which has {depth} encoder layers; "
                             f"choose 0 to {depth}.")
        # Layers past ``layer`` never influence the loss: drop them (8x less work for layer 3 of ViT-L/14).
        encoder = getattr(getattr(self.vision, "vision_model", self.vision), "encoder", None)
        if encoder is not None and isinstance(getattr(encoder, "layers", None), torch.nn.ModuleList):
            encoder.layers = encoder.layers[:layer]
        self.vision.eval().requires_grad_(False)
        self.layer = layer
        self.size = self.vision.config.image_size
        self._reference_grams: dict[tuple, Tensor] = {}

    def gram(self, images: Tensor) -> Tensor:
        """The ``(B, D, D)`` Gram matrices of ``images`` ``(B, C, H, W)`` in [0, 1]."""
        dtype = next(self.vision.parameters()).dtype
        images = as_rgb(images)
        if self.resize_mode == "processor":
            images = resize_center_crop(images, self.size)
        else:
            images = plain_resize(images, self.size, self.resize_mode)
        pixels = normalize(images, CLIP_MEAN, CLIP_STD).to(dtype)
        hidden = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[self.layer]
        tokens = hidden[:, 1:].to(images.dtype)  # token 0 is the class token
        return gram(tokens) if self.gram_kind == "per_token" else tokens.transpose(1, 2) @ tokens

    def reference_gram(self, like: Tensor) -> Tensor:
        """The reference's ``(D, D)`` Gram matrix, computed once per device and dtypes."""
        key = (like.device, like.dtype, next(self.vision.parameters()).dtype)
        if key not in self._reference_grams:
            with torch.no_grad():
                self._reference_grams[key] = self.gram(image_like(self.reference, like))[0]
        return self._reference_grams[key]

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        diff = self.gram(images) - self.reference_gram(images)
        loss = diff.pow(2).sum((1, 2)) if self.reduction == "sum" else diff.pow(2).mean((1, 2))
        self.terms = {"style_loss": loss.detach()}
        return loss
