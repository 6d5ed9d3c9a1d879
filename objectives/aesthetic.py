"""LAION aesthetic predictor: an MLP on normalized CLIP ViT-L/14 image embeddings, scores ~1-10."""

from __future__ import annotations

import os
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from sdo_lightning.contracts import Objective
from sdo_lightning.objectives._inputs import (
    as_rgb,
    load_state_dict,
    normalize,
    offline_default,
    resize_center_crop,
)
from sdo_lightning.objectives.clip import CLIP_MEAN, CLIP_STD

MLP_HOW = ("download sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-predictor "
           "(or sa_0_4_vit_l_14_linear.pth from github.com/LAION-AI/aesthetic-predictor) and pass its path as mlp")
# The improved predictor: Linear Dropout(0.2) Linear Dropout(0.2) Linear Dropout(0.1) Linear Linear;
# a state dict names its linear layers by these indices.
IMPROVED_LINEARS = (0, 2, 4, 6, 7)
IMPROVED_DROPOUT = {1: 0.2, 3: 0.2, 5: 0.1}


class ImprovedAestheticMLP(nn.Module):
    """The improved predictor's head; its state dict keys are ``layers.N.weight`` / ``layers.N.bias``."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        linears = iter(zip(widths[:-1], widths[1:]))
        for i in range(IMPROVED_LINEARS[-1] + 1):
            layers.append(nn.Linear(*next(linears)) if i in IMPROVED_LINEARS else nn.Dropout(IMPROVED_DROPOUT[i]))
        self.layers = nn.Sequential(*layers)

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds)


def aesthetic_head(state: dict[str, Tensor], path: str) -> nn.Module:
    """The predictor head for ``state``: the improved MLP (``layers.N.*`` keys) or the original linear one."""
    if set(state) == {"weight", "bias"}:
        head: nn.Module = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    elif all(f"layers.{i}.{p}" in state for i in IMPROVED_LINEARS for p in ("weight", "bias")):
        widths = [state["layers.0.weight"].shape[1]] + [state[f"layers.{i}.weight"].shape[0] for i in IMPROVED_LINEARS]
        head = ImprovedAestheticMLP(widths)
    else:
        raise ValueError(f"aesthetic MLP {path!r} has keys {sorted(state)[:4]}..., neither the improved predictor's "
                         f"'layers.0.weight' ... 'layers.7.bias' nor the linear predictor's 'weight'/'bias'; {MLP_HOW}.")
    try:
        head.load_state_dict(state)
    except RuntimeError:
        raise ValueError(f"aesthetic MLP {path!r} has layers of mismatched sizes; {MLP_HOW}.") from None
    return head


class AestheticScore(Objective):
    """Negative LAION aesthetic score per sample (higher score = more aesthetic, so lower loss).

    The score is ``MLP(e / ||e||)`` with ``e`` the CLIP image embedding (vision tower + visual
    projection). Preprocessing is tensor-only: grayscale to RGB, bicubic resize of the short side
    and center crop to the tower's input size, CLIP normalization. The head is the improved
    predictor's MLP (768-1024-128-64-16-1) or the original linear predictor, told apart by the
    keys of the file. Logs ``aesthetic`` (the score) per sample.

    Args:
        mlp: the predictor's weights: ``sac+logos+ava1-l14-linearMSE.pth``
            (github.com/christophschuhmann/improved-aesthetic-predictor) or
            ``sa_0_4_vit_l_14_linear.pth`` (github.com/LAION-AI/aesthetic-predictor).
        model: the transformers ``CLIPModel`` the predictor was trained on, a directory or hub id.
        target: None for loss ``-score``; a number for ``|score - target|`` (the paper's Eq. 25
            uses 10, the top of the scale).
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
    """

    def __init__(
        self,
        mlp: str | os.PathLike,
        model: str = "openai/clip-vit-large-patch14",
        target: float | None = None,
        local_files_only: bool | None = None,
    ) -> None:
        super().__init__()
        from transformers import CLIPModel

        state = load_state_dict(mlp, "aesthetic MLP weights file", MLP_HOW)
        self.head = aesthetic_head(state, str(mlp))
        try:
            clip = CLIPModel.from_pretrained(model, local_files_only=offline_default(local_files_only))
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"could not load a CLIP model from {model!r} ({type(err).__name__}); give a local directory or a hub "
                f"id with network access (e.g. fetch it first with `hf download {model}`)."
            ) from None
        # Only the image side is needed; the text tower is left behind.
        self.vision = clip.vision_model
        self.projection = clip.visual_projection
        embed_dim, head_dim = self.projection.out_features, next(self.head.parameters()).shape[1]
        if embed_dim != head_dim:
            raise ValueError(f"the aesthetic MLP {str(mlp)!r} takes {head_dim}-dim embeddings but CLIP {model!r} gives "
                             f"{embed_dim}-dim ones; use the CLIP model the predictor was trained on "
                             "(openai/clip-vit-large-patch14 for the LAION predictors).")
        self.size = clip.config.vision_config.image_size
        self.target = target
        self.eval().requires_grad_(False)

    def score(self, images: Tensor) -> Tensor:
        """The aesthetic score ``(B,)`` of images ``(B, C, H, W)`` in [0, 1]."""
        dtype = self.projection.weight.dtype
        pixels = normalize(resize_center_crop(as_rgb(images), self.size), CLIP_MEAN, CLIP_STD).to(dtype)
        embeds = self.projection(self.vision(pixel_values=pixels).pooler_output)
        return self.head(F.normalize(embeds, dim=-1))[:, 0].to(images.dtype)

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        score = self.score(images)
        self.terms = {"aesthetic": score.detach()}
        return -score if self.target is None else (score - self.target).abs()
