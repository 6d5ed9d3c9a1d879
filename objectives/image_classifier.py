"""Pretrained torchvision or timm classifiers (e.g. an ImageNet ResNet-50): targeted or untargeted attacks."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdo_lightning.contracts import Objective
from sdo_lightning.objectives._inputs import as_rgb, load_state_dict, normalize, resize_center_crop

# ImageNet statistics and the usual eval transform (resize 256, crop 224): used when neither the
# torchvision weights' meta nor timm's pretrained_cfg says otherwise.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP, DEFAULT_RESIZE = 224, 256
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def _is_file_path(weights: str) -> bool:
    return weights.endswith(WEIGHT_SUFFIXES) or os.sep in weights or Path(weights).exists()


def _file_state(weights: str, model: str) -> dict[str, Tensor]:
    state = load_state_dict(weights, f"classifier weights file for {model!r}",
                            "give the path of the model's state dict (.pth/.safetensors)")
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _interpolation(name: str) -> str:
    """The tensor resize mode closest to a torchvision / timm interpolation name."""
    return "bilinear" if str(name) == "bilinear" else "bicubic"


def _load_into(net: nn.Module, state: dict[str, Tensor], weights: str, model: str) -> None:
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ValueError(f"weights file {weights!r} does not fit {model!r} ({first}); give the state dict of that "
                         "architecture.") from None


def torchvision_classifier(name: str, weights: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """A torchvision classifier and its preprocessing (crop, resize, mean, std)."""
    try:
        from torchvision import models
    except ImportError:
        raise ModuleNotFoundError(f"ImageClassifierObjective needs torchvision for 'torchvision/{name}'; install it "
                                  "with `pip install torchvision` (the build matching your torch).") from None
    config: dict[str, Any] = {"crop": DEFAULT_CROP, "resize": DEFAULT_RESIZE, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                              "interpolation": "bilinear"}
    if weights is not None and _is_file_path(weights):
        state = _file_state(weights, f"torchvision/{name}")
        net = models.get_model(name, weights=None)
        _load_into(net, state, weights, f"torchvision/{name}")
        return net, config
    try:
        enum = models.get_model_weights(name)
    except (ValueError, KeyError):
        raise ValueError(f"torchvision has no classifier {name!r}; use a name of torchvision.models.list_models() "
                         "(e.g. torchvision/resnet50).") from None
    tag = weights or "DEFAULT"
    try:
        chosen = enum[tag]
    except KeyError:
        raise ValueError(f"torchvision/{name} has no weights {tag!r}; choose one of {list(enum.__members__)} or give "
                         "a weights file path.") from None
    try:
        net = models.get_model(name, weights=chosen)
    except (OSError, RuntimeError) as err:
        raise FileNotFoundError(f"could not fetch the torchvision weights {chosen} ({type(err).__name__}); run once "
                                "with network access (they are cached under $TORCH_HOME/hub/checkpoints) or give a "
                                "weights file path.") from None
    transform = chosen.transforms()
    first = lambda v: v[0] if isinstance(v, Sequence) else v  # noqa: E731
    config.update({k: first(getattr(transform, a)) for k, a in (("crop", "crop_size"), ("resize", "resize_size"))
                   if hasattr(transform, a)})
    config.update({k: tuple(getattr(transform, k)) for k in ("mean", "std") if hasattr(transform, k)})
    config["interpolation"] = _interpolation(getattr(getattr(transform, "interpolation", None), "value", "bilinear"))
    return net, config


def timm_classifier(name: str, weights: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """A timm classifier and its preprocessing (crop, resize, mean, std) from its pretrained_cfg."""
    try:
        import timm
    except ImportError:
        raise ModuleNotFoundError(f"ImageClassifierObjective needs timm for 'timm/{name}'; install it with "
                                  "`pip install timm`.") from None
    if weights is not None and not _is_file_path(weights):
        raise ValueError(f"weights={weights!r} for timm/{name} is no file; put a pretrained tag in the name "
                         f"(e.g. timm/{name.split('.')[0]}.a1_in1k) and give weights only as a checkpoint path.")
    if weights is not None:
        state = _file_state(weights, f"timm/{name}")
    try:
        net = timm.create_model(name, pretrained=weights is None)
    except (OSError, RuntimeError, ValueError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise FileNotFoundError(f"could not create timm/{name} with pretrained weights ({reason}); check the name "
                                "against timm.list_models(), run once with network access or give a checkpoint "
                                "path as weights.") from None
    if weights is not None:
        _load_into(net, state, weights, f"timm/{name}")
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    crop = cfg.get("input_size", (3, DEFAULT_CROP, DEFAULT_CROP))[-1]
    return net, {
        "crop": crop,
        "resize": math.floor(crop / cfg.get("crop_pct", DEFAULT_CROP / DEFAULT_RESIZE)),
        "mean": tuple(cfg.get("mean", IMAGENET_MEAN)),
        "std": tuple(cfg.get("std", IMAGENET_STD)),
        "interpolation": _interpolation(cfg.get("interpolation", "bicubic")),
    }


class ImageClassifierObjective(Objective):
    """Cross-entropy of a pretrained torchvision or timm classifier: reach a class, or leave one.

    Targeted (default): loss ``CE(logits, target) = -log p(target | x)``, the target being
    ``target_class`` or the batch's ``"target"``. Untargeted: loss ``-CE(logits, source)``, the
    source class being ``batch[label_key]`` when ``label_key`` is set, else what the classifier
    says of the unoptimized sample (``batch["initial_images"]``). Preprocessing is tensor-only:
    grayscale to RGB, bicubic resize of the short side, center crop, mean/std normalization, all
    taken from the weights' metadata (torchvision) or ``pretrained_cfg`` (timm) unless overridden.
    Logs ``target_prob`` (or ``source_prob``) and ``success`` (1 where the top class is the target,
    or is no longer the source) per sample. Bound the perturbation with
    ``LatentOptimization(linf_radius=...)``.

    Args:
        model: ``torchvision/<name>`` (e.g. ``torchvision/resnet50``) or ``timm/<name>``
            (e.g. ``timm/resnet50.a1_in1k``).
        weights: torchvision: a weights tag of the model (``IMAGENET1K_V2``; None for ``DEFAULT``)
            or a state-dict file; timm: None for the pretrained weights of the name, or a checkpoint file.
        target_class: the class to reach; None to read ``batch["target"]``.
        untargeted: move away from the source class instead.
        label_key: untargeted only: the batch entry holding each sample's source class
            (e.g. ``class_label``); None to use the classifier's prediction on the unoptimized sample.
        image_size: override the classifier's input (crop) size.
        resize_size: override the short side the images are resized to before the crop.
        mean: override the normalization mean (three values).
        std: override the normalization standard deviation (three values).
    """

    def __init__(
        self,
        model: str,
        weights: str | None = None,
        target_class: int | None = None,
        untargeted: bool = False,
        label_key: str | None = None,
        image_size: int | None = None,
        resize_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
    ) -> None:
        super().__init__()
        source, _, name = model.partition("/")
        if source == "torchvision" and name:
            self.classifier, config = torchvision_classifier(name, weights)
        elif source == "timm" and name:
            self.classifier, config = timm_classifier(name, weights)
        else:
            raise ValueError(f"model={model!r} names no classifier; write 'torchvision/<name>' (e.g. torchvision/resnet50) "
                             "or 'timm/<name>'.")
        self.classifier.eval().requires_grad_(False)
        self.crop = image_size or config["crop"]
        self.resize = resize_size or (config["resize"] if image_size is None else image_size)
        self.mean = tuple(mean or config["mean"])
        self.std = tuple(std or config["std"])
        self.interpolation = config["interpolation"]
        self.target_class = target_class
        self.untargeted = untargeted
        self.label_key = label_key

    def preprocess(self, images: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` in [0, 1] -> classifier inputs, differentiably."""
        resized = resize_center_crop(as_rgb(images), self.crop, self.resize, self.interpolation)
        return normalize(resized, self.mean, self.std)

    def logits(self, images: Tensor) -> Tensor:
        dtype = next(self.classifier.parameters()).dtype
        return self.classifier(self.preprocess(images).to(dtype)).to(images.dtype)

    def _classes(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        if self.untargeted:
            if self.label_key is not None:
                if self.label_key not in batch:
                    raise KeyError(f"ImageClassifierObjective(label_key={self.label_key!r}) found no such batch entry.")
                return torch.as_tensor(batch[self.label_key], device=images.device).long().reshape(len(images))
            if "initial_images" not in batch:
                raise KeyError("untargeted ImageClassifierObjective needs batch['initial_images'] (the unoptimized "
                               "samples) or a label_key.")
            with torch.no_grad():
                return self.logits(batch["initial_images"].to(images)).argmax(-1)
        if self.target_class is not None:
            return torch.full((len(images),), self.target_class, dtype=torch.long, device=images.device)
        if "target" in batch:
            return torch.as_tensor(batch["target"], device=images.device).long().reshape(len(images))
        raise KeyError("ImageClassifierObjective has no target: set target_class or give the batch a 'target'.")

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        classes = self._classes(images, batch)
        logits = self.logits(images)
        ce = F.cross_entropy(logits, classes, reduction="none")
        prob = (-ce).detach().exp()
        top = logits.detach().argmax(-1)
        if self.untargeted:
            self.terms = {"source_prob": prob, "success": (top != classes).to(images.dtype)}
            return -ce
        self.terms = {"target_prob": prob, "success": (top == classes).to(images.dtype)}
        return ce
