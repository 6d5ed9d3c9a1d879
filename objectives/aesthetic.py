"""LAION aesthetic predictor: an MLP on normalized CLIP ViT-L/14 image embeddings, scores ~1-10."""

from __future__ import annotations

import os
from typing import Any

import torch
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
from sdo_lightning.objectives.augment import Cutouts
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


class AestheticEnsemble(Objective):
    """A weighted ensemble of LAION aesthetic heads on several CLIP models, averaged over random
    cutouts: the scorer of the authors' released aesthetic script.

    Every model scores the same ``cutouts`` random square crops of the image (see
    :class:`~sdo_lightning.objectives.augment.Cutouts`; drawn from the global torch generator every
    call), each pooled to the tower's input size and CLIP-normalized. Head ``i`` scores each crop
    ``head_i(e / ||e||)``, clipped to ``score_range``, averaged over the crops: ``s_i``. The score is
    ``sum_i weights[i] * s_i / len(heads)``; the loss is ``|score - target|`` (or ``-score``). The
    released script: the LAION v1 linear heads ``sa_0_4_vit_l_14_linear.pth`` on ViT-L/14 and
    ``sa_0_4_vit_b_32_linear.pth`` on ViT-B/32 (github.com/LAION-AI/aesthetic-predictor), weights
    0.5 and 1.5, range [1, 10], 16 cutouts at cut power 0.3, target 10. Logs ``aesthetic``.

    Args:
        mlps: the heads' weight files (linear or improved-MLP heads, told apart by their keys).
        models: the transformers ``CLIPModel`` of each head, directories or hub ids.
        weights: one weight per head (default all 1); the sum is divided by the number of heads.
        score_range: ``[low, high]`` to clip each crop's score to, or None.
        cutouts: random crops per call (0: the whole image, resized and center-cropped).
        cut_power: below 1 favours large crops.
        target: None for loss ``-score``; a number for ``|score - target|``.
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
    """

    def __init__(
        self,
        mlps: list[str],
        models: list[str],
        weights: list[float] | None = None,
        score_range: list[float] | None = None,
        cutouts: int = 16,
        cut_power: float = 1.0,
        target: float | None = None,
        local_files_only: bool | None = None,
    ) -> None:
        super().__init__()
        weights = [1.0] * len(mlps) if weights is None else list(weights)
        if not mlps or len(models) != len(mlps) or len(weights) != len(mlps):
            raise ValueError(f"AestheticEnsemble needs one CLIP model and one weight per head; got {len(mlps)} heads, "
                             f"{len(models)} models and {len(weights)} weights.")
        if score_range is not None and (len(score_range) != 2 or score_range[0] > score_range[1]):
            raise ValueError(f"AestheticEnsemble score_range must be [low, high] with low <= high, got {score_range}.")
        # one AestheticScore per head: the same loading, checks and embedding
        self.members = torch.nn.ModuleList(
            AestheticScore(mlp, model, local_files_only=local_files_only) for mlp, model in zip(mlps, models)
        )
        sizes = {m.size for m in self.members}
        if len(sizes) != 1:
            raise ValueError(f"AestheticEnsemble scores the same crops with every model, but the models take "
                             f"{sorted(sizes)} pixels; use CLIP models of one input size.")
        self.size = sizes.pop()
        self.weights = weights
        self.score_range = None if score_range is None else (float(score_range[0]), float(score_range[1]))
        self.cutouts = Cutouts(self.size, cutouts, cut_power) if cutouts else None
        self.target = target
        self.eval().requires_grad_(False)

    def _head_score(self, member: AestheticScore, pixels: Tensor) -> Tensor:
        dtype = member.projection.weight.dtype
        embeds = member.projection(member.vision(pixel_values=pixels.to(dtype)).pooler_output)
        score = member.head(F.normalize(embeds, dim=-1))[:, 0].to(pixels.dtype)
        return score if self.score_range is None else score.clamp(*self.score_range)

    def score(self, images: Tensor) -> Tensor:
        """The ensemble score ``(B,)`` of images ``(B, C, H, W)`` in [0, 1]."""
        images = as_rgb(images)
        if self.cutouts is None:
            crops = resize_center_crop(images, self.size)[None]
        else:
            crops = self.cutouts(images)  # (K, B, C, size, size)
        pixels = normalize(crops.flatten(0, 1), CLIP_MEAN, CLIP_STD)
        total = 0
        for w, member in zip(self.weights, self.members):
            total = total + w * self._head_score(member, pixels).view(len(crops), len(images)).mean(0)
        return total / len(self.members)

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        score = self.score(images)
        self.terms = {"aesthetic": score.detach()}
        return -score if self.target is None else (score - self.target).abs()
