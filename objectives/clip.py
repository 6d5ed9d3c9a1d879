"""CLIP text-image score: how well each image matches its prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sdo_lightning._hub import offline
from sdo_lightning.contracts import Objective
from sdo_lightning.objectives._inputs import as_rgb, normalize, plain_resize, prompts_for, resize_center_crop
from sdo_lightning.objectives.augment import DiffAugment

# CLIP's published preprocessing statistics (used when the model directory has no processor config).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_CONFIG = "preprocessor_config.json"


def _size(value: Any, square: bool) -> int | tuple[int, int] | None:
    """A transformers size entry (an int, ``[h, w]``, ``{"shortest_edge": n}`` or ``{"height", "width"}``)
    as a short side ``n`` or an exact ``(h, w)``; a lone int is a square when ``square``; None if unknown."""
    if isinstance(value, (list, tuple)) and len(value) in (1, 2):
        return _size(value[0], square) if len(value) == 1 else (int(value[0]), int(value[1]))
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value) if square else value
    if isinstance(value, dict):
        if value.get("shortest_edge") and not value.get("longest_edge"):
            return _size(int(value["shortest_edge"]), square)
        if value.get("height") and value.get("width"):
            return int(value["height"]), int(value["width"])
    return None


def _three(value: Any, default: tuple[float, ...]) -> tuple[float, ...]:
    if value is None:
        return default
    return (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)


def clip_preprocessing(model: str, image_size: int, local_files_only: bool | None = None) -> dict[str, Any]:
    """The eval transform transformers' ``CLIPImageProcessor`` applies for ``model``.

    Read from the model's ``preprocessor_config.json`` when it has one; otherwise CLIP's published
    transform at the vision tower's input size (short side resized to ``image_size``, bicubic,
    center crop ``image_size``, CLIP's mean/std), which is the processor's default for 224-pixel
    models. Returns ``crop``, ``resize`` (the short side, an exact ``(height, width)``, or None for
    ``do_resize: false``), ``mean``, ``std`` and ``interpolation``, the keys of the classifier
    objectives' configs, for :func:`resize_center_crop` and :func:`normalize`. A hub id whose
    processor config cannot be fetched (or is not cached, offline) gets the defaults.
    """
    config: dict[str, Any] = {"crop": image_size, "resize": image_size, "mean": CLIP_MEAN, "std": CLIP_STD,
                              "interpolation": "bicubic"}
    local = Path(model).expanduser()
    if local.is_dir() and not (local / PROCESSOR_CONFIG).is_file():
        return config
    from transformers import ImageProcessingMixin

    try:
        raw, _ = ImageProcessingMixin.get_image_processor_dict(str(local) if local.is_dir() else model,
                                                               local_files_only=offline(local_files_only))
    except (OSError, ValueError) as err:
        if local.is_dir():
            raise ValueError(f"the {PROCESSOR_CONFIG} of {model!r} is not readable ({type(err).__name__}); fix it, or "
                             "delete it to use CLIP's default preprocessing.") from None
        return config
    resize = _size(raw.get("size", image_size), square=False) if raw.get("do_resize", True) else None
    crop = _size(raw.get("crop_size", image_size), square=True) if raw.get("do_center_crop", True) else None
    if (raw.get("do_resize", True) and resize is None) or (raw.get("do_center_crop", True) and crop is None):
        raise ValueError(f"the {PROCESSOR_CONFIG} of {model!r} has size {raw.get('size')!r} and crop_size "
                         f"{raw.get('crop_size')!r}; CLIPScore reads an int, [height, width], "
                         "{'shortest_edge': n} or {'height': h, 'width': w}.")
    if crop is not None and crop != (image_size, image_size):
        raise ValueError(f"the {PROCESSOR_CONFIG} of {model!r} crops {crop[0]} x {crop[1]} pixels but its vision "
                         f"tower takes {image_size} x {image_size}; fix crop_size there.")
    resample = raw.get("resample", 3)  # PIL's codes: 2 bilinear, 3 bicubic
    config.update(resize=resize, interpolation="bilinear" if resample in (2, "bilinear") else "bicubic")
    if raw.get("do_normalize", True):
        config.update(mean=_three(raw.get("image_mean"), CLIP_MEAN), std=_three(raw.get("image_std"), CLIP_STD))
    else:
        config.update(mean=(0.0,) * 3, std=(1.0,) * 3)
    return config


class CLIPScore(Objective):
    """``1 - cos(CLIP image embedding, CLIP text embedding)`` per sample; lower is better.

    Preprocessing is tensor-only and differentiable (no PIL in the graph) and follows transformers'
    ``CLIPImageProcessor`` with the model's ``preprocessor_config.json`` (CLIP's published
    transform when there is none): grayscale images are repeated to three channels, the short
    side is resized (bicubic, antialiased) and the center is cropped to the vision tower's input
    size, then normalized with the processor's mean/std (see :func:`clip_preprocessing`). It
    differs from the processor on the same pixels only by PIL's bicubic kernel and its rounding
    to 8 bits. Logs ``clip_score`` (the cosine) per sample.

    Args:
        model: a transformers ``CLIPModel`` directory or hub id
            (e.g. ``openai/clip-vit-large-patch14``).
        prompt: the text to match; None to read ``batch["prompt"]`` (one string per sample).
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
        augment_copies: score each image as the mean over this many DiffAugment copies of it
            (:class:`~sdo_lightning.objectives.augment.DiffAugment`, drawn from the global torch
            generator every call); 0 scores the image itself. The authors' released
            text-editing script uses 20: the gradient then rewards what every view shows,
            not what fools CLIP at one framing.
        augment_policy: the DiffAugment operations, comma-separated.
        resize: ``processor``: the transform above; ``bilinear`` or ``bicubic``: a plain
            ``F.interpolate`` of the whole image to the tower's size, without antialiasing or
            crop, as the released scripts do (``bilinear`` in the text-editing one).
    """

    def __init__(
        self,
        model: str,
        prompt: str | None = None,
        local_files_only: bool | None = None,
        augment_copies: int = 0,
        augment_policy: str = "color,translation,resize,cutout",
        resize: Literal["processor", "bilinear", "bicubic"] = "processor",
    ) -> None:
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer

        local_files_only = offline(local_files_only)
        try:
            self.clip = CLIPModel.from_pretrained(model, local_files_only=local_files_only)
            self.tokenizer = CLIPTokenizer.from_pretrained(model, local_files_only=local_files_only)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"could not load a CLIP model and tokenizer from {model!r} ({type(err).__name__}); give a local "
                f"directory or a hub id with network access (e.g. fetch it first with `hf download {model}`)."
            ) from err
        self.clip.eval().requires_grad_(False)
        self.prompt = prompt
        self.size = self.clip.config.vision_config.image_size
        config = clip_preprocessing(model, self.size, local_files_only)
        self.crop, self.resize, self.interpolation = config["crop"], config["resize"], config["interpolation"]
        self.mean, self.std = config["mean"], config["std"]
        if resize not in ("processor", "bilinear", "bicubic"):
            raise ValueError(f"CLIPScore resize must be 'processor', 'bilinear' or 'bicubic', got {resize!r}.")
        self.resize_mode = resize
        if augment_copies < 0:
            raise ValueError(f"CLIPScore augment_copies must be >= 0 (0: no augmentation), got {augment_copies}.")
        self.augment = DiffAugment(augment_copies, augment_policy) if augment_copies else None
        self._text_cache: dict[str, Tensor] = {}

    def preprocess(self, images: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` in [0, 1] -> CLIP pixel values, differentiably."""
        images = as_rgb(images)
        if self.resize_mode != "processor":
            return normalize(plain_resize(images, self.size, self.resize_mode), self.mean, self.std)
        resize = tuple(images.shape[-2:]) if self.resize is None else self.resize  # do_resize: false
        return normalize(resize_center_crop(images, self.crop, resize, self.interpolation), self.mean, self.std)

    def image_embeds(self, images: Tensor) -> Tensor:
        dtype = self.clip.visual_projection.weight.dtype
        pooled = self.clip.vision_model(pixel_values=self.preprocess(images).to(dtype)).pooler_output
        return F.normalize(self.clip.visual_projection(pooled).to(images.dtype), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            tokens = self.tokenizer(missing, padding=True, truncation=True, return_tensors="pt")
            device = self.clip.text_projection.weight.device
            pooled = self.clip.text_model(input_ids=tokens.input_ids.to(device),
                                          attention_mask=tokens.attention_mask.to(device)).pooler_output
            for p, e in zip(missing, F.normalize(self.clip.text_projection(pooled), dim=-1)):
                self._text_cache[p] = e
        return torch.stack([self._text_cache[p] for p in prompts])

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        prompts = prompts_for("CLIPScore", self.prompt, batch, len(images))
        text = self.text_embeds(prompts).to(images.dtype)
        if self.augment is None:
            cosine = (self.image_embeds(images) * text).sum(-1)
        else:  # the mean cosine over each image's augmented copies
            copies = self.image_embeds(self.augment(images)).view(len(images), self.augment.copies, -1)
            cosine = (copies * text[:, None]).sum(-1).mean(1)
        self.terms = {"clip_score": cosine.detach()}
        return 1 - cosine
