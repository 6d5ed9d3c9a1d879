"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), VGG variant: a perceptual distance to the unoptimized sample or a reference image.

Written here from the formula, since neither torchvision nor the ``lpips`` package is a
dependency; it reads the same two weight files those packages use. Notation:

    x in [0, 1]                  images;  x' = (2x - 1 - shift) / scale   (LPIPS scaling layer)
    f_l(x')  (B, C_l, H_l, W_l)  VGG16 activation at tap l (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
    n_l = f_l / (||f_l||_channels + 1e-10)        unit-normalized along channels, per pixel
    d(x, y) = sum_l mean_{h,w} sum_c w_{l,c} (n_l(x) - n_l(y))^2     w_l: the learned 1x1 "lin" weights
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdo_lightning.contracts import Objective
from sdo_lightning.objectives._inputs import as_rgb, image_like, load_image, load_state_dict, normalize

# torchvision's ``vgg16().features`` layout: the index of every 3x3 conv (each followed by a ReLU
# at index + 1) and of every 2x2 max-pool. The fifth pool (index 30) follows the last tap, so
# the stack stops at index 29.
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_POOLS = (4, 9, 16, 23)
VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
# LPIPS's ScalingLayer: inputs in [-1, 1] are shifted and scaled to ImageNet-like statistics.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # LPIPS's epsilon in the channel normalization

VGG_HOW = ("download torchvision's VGG16 IMAGENET1K_V1 weights (https://download.pytorch.org/models/vgg16-397923af.pth) "
           "and pass the file as vgg_weights")
LIN_HOW = ("download LPIPS's linear weights lpips/weights/v0.1/vgg.pth from github.com/richzhang/PerceptualSimilarity "
           "(also inside the `lpips` pip package) and pass the file as lpips_weights")


def vgg16_features(state: dict[str, Tensor], path: str) -> nn.Sequential:
    """VGG16's feature stack up to relu5_3 with torchvision's indices, widths read from ``state``."""
    layers: list[nn.Module] = []
    for index in range(VGG16_TAPS[-1] + 1):
        if index in VGG16_CONVS:
            weight = state.get(f"features.{index}.weight")
            if weight is None or weight.ndim != 4 or f"features.{index}.bias" not in state:
                raise ValueError(f"VGG16 weights {path!r} have no conv 'features.{index}.weight'/'.bias' of torchvision's "
                                 f"vgg16().features layout; {VGG_HOW}.")
            layers.append(nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=3, padding=1))
        elif index - 1 in VGG16_CONVS:
            layers.append(nn.ReLU())  # not in place: the taps are read after it
        else:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    features = nn.Sequential(*layers)
    features.load_state_dict({k[len("features."):]: v for k, v in state.items()
                              if k.startswith("features.") and int(k.split(".")[1]) <= VGG16_TAPS[-1]})
    return features


class LPIPSFidelity(Objective):
    """LPIPS (VGG) distance between each image and its unoptimized version or a reference; lower is closer.

    The comparison image is ``batch["initial_images"]`` (what LatentOptimization passes: the
    unoptimized samples), or the fixed ``reference`` image when one is given. Preprocessing is
    tensor-only: grayscale is repeated to RGB and, with ``size``, both images are resized
    bilinearly before the network. Logs ``lpips`` per sample.

    Args:
        vgg_weights: torchvision's VGG16 state dict ``vgg16-397923af.pth`` (IMAGENET1K_V1), from
            https://download.pytorch.org/models/vgg16-397923af.pth; only its ``features.N.*`` keys are read.
        lpips_weights: LPIPS's linear-layer weights for VGG, ``lpips/weights/v0.1/vgg.pth`` of
            github.com/richzhang/PerceptualSimilarity (keys ``lin0.model.1.weight`` ... ``lin4.model.1.weight``).
        reference: an image file (PNG/JPG) or saved tensor (.npz/.pt) to compare every sample with,
            instead of its unoptimized version; resized to each batch's image size.
        size: resize images to ``size x size`` before the network; None keeps their size (VGG16
            needs at least 16 x 16 pixels to reach relu5_3).
    """

    def __init__(
        self,
        vgg_weights: str | os.PathLike,
        lpips_weights: str | os.PathLike,
        reference: str | os.PathLike | None = None,
        size: int | None = None,
    ) -> None:
        super().__init__()
        self.vgg = vgg16_features(load_state_dict(vgg_weights, "VGG16 weights file", VGG_HOW), str(vgg_weights))
        lin_state = load_state_dict(lpips_weights, "LPIPS weights file", LIN_HOW)
        widths = [self.vgg[tap - 1].out_channels for tap in VGG16_TAPS]
        lins = []
        for l, width in enumerate(widths):
            weight = lin_state.get(f"lin{l}.model.1.weight")
            if weight is None or weight.numel() != width:
                got = "nothing" if weight is None else f"shape {tuple(weight.shape)}"
                raise ValueError(f"LPIPS weights {str(lpips_weights)!r} have {got} under 'lin{l}.model.1.weight' where "
                                 f"the VGG16 tap relu{l + 1} needs (1, {width}, 1, 1); {LIN_HOW}.")
            lins.append(weight.reshape(width))
        self.lins = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in lins])
        self.requires_grad_(False).eval()
        self.size = size
        if reference is not None:
            self.register_buffer("reference", load_image(reference), persistent=False)
        else:
            self.reference = None

    def _prepare(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        images = as_rgb(images).to(self.lins[0].dtype)
        if tuple(images.shape[-2:]) != size:
            work = images if images.dtype in (torch.float32, torch.float64) else images.float()
            images = F.interpolate(work, size=size, mode="bilinear", align_corners=False, antialias=True).to(images.dtype)
        return normalize(2 * images - 1, LPIPS_SHIFT, LPIPS_SCALE)

    def features(self, images: Tensor, size: tuple[int, int]) -> list[Tensor]:
        """The unit-normalized activations at the five taps, for images in [0, 1]."""
        x = self._prepare(images, size)
        taps = []
        for index, layer in enumerate(self.vgg):
            x = layer(x)
            if index in VGG16_TAPS:
                # vector_norm's backward is 0 at a zero vector, where sqrt(sum(x^2)) gives NaN
                # in float: EPS rounds to 0 in fp16, and a zero vector would give 0 / 0
                work = x if x.dtype in (torch.float32, torch.float64) else x.float()
                taps.append((work / (torch.linalg.vector_norm(work, dim=1, keepdim=True) + EPS)).to(x.dtype))
        return taps

    def distance(self, images: Tensor, others: Tensor) -> Tensor:
        """LPIPS between ``images`` and ``others`` (same batch size, or one image), per sample."""
        size = (self.size, self.size) if self.size is not None else tuple(images.shape[-2:])
        if min(size) < 16:
            raise ValueError(f"LPIPSFidelity needs images of at least 16 x 16 pixels (VGG16 pools four times before "
                             f"relu5_3) but got {size[0]} x {size[1]}; set size (e.g. 64) to resize them.")
        ours = self.features(images, size)
        with torch.no_grad():
            theirs = self.features(others.to(images.device), size)
        total = 0
        for a, b, w in zip(ours, theirs, self.lins):
            total = total + ((a - b).pow(2) * w.view(1, -1, 1, 1)).sum(1).mean((-2, -1))
        return total.to(images.dtype)

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        if self.reference is not None:
            others = image_like(self.reference, images)
        elif "initial_images" in batch:
            others = batch["initial_images"]
        else:
            raise KeyError("LPIPSFidelity needs batch['initial_images'] (the unoptimized samples) or a reference image.")
        loss = self.distance(images, others)
        self.terms = {"lpips": loss.detach()}
        return loss
