"""Backbones: a diffusion model behind one small interface (:class:`Backbone`), one file per family.

=========================  ==============================================================
``base``                   the :class:`Backbone` contract and the prompt-conditioned base
``loading``                loading diffusers models, VAE scaling, learned-sigma outputs
``pixel``                  pixel-space ``UNet2DModel`` pipelines and the embedded digits model
``stable_diffusion``       Stable Diffusion 1.x/2.x (and LCM-distilled SD UNets)
``pixart``                 PixArt-alpha
``sdxl``                   Stable Diffusion XL and SDXL-Turbo
``sd3``                    Stable Diffusion 3 / 3.5 (rectified flow)
``flux``                   FLUX.1 dev and schnell (rectified flow)
=========================  ==============================================================

A third-party model family subclasses :class:`Backbone` (or :class:`TextConditionedBackbone`) and
declares it under the entry-point group ``sdo_lightning.backbones``.
"""

from sdo_lightning.backbones.base import (Backbone, PooledTextCondition, PooledTextConditionedBackbone, TextCondition,
                                          TextConditionedBackbone)
from sdo_lightning.backbones.flux import FluxBackbone
from sdo_lightning.backbones.pixart import PixArtAlphaBackbone
from sdo_lightning.backbones.pixel import DigitsBackbone, FlowDigitsBackbone, PixelUNetBackbone
from sdo_lightning.backbones.sd3 import StableDiffusion3Backbone
from sdo_lightning.backbones.sdxl import StableDiffusionXLBackbone
from sdo_lightning.backbones.stable_diffusion import StableDiffusionBackbone

__all__ = [
    "Backbone",
    "DigitsBackbone",
    "FlowDigitsBackbone",
    "FluxBackbone",
    "PixArtAlphaBackbone",
    "PixelUNetBackbone",
    "PooledTextCondition",
    "PooledTextConditionedBackbone",
    "StableDiffusion3Backbone",
    "StableDiffusionBackbone",
    "StableDiffusionXLBackbone",
    "TextCondition",
    "TextConditionedBackbone",
]
