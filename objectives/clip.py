"""CLIP text-image score: how well each image matches its prompt."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdo_lightning._hub import offline
from sdo_lightning.contracts import Objective
from sdo_lightning.objectives._inputs import prompts_for

# CLIP's published preprocessing statistics (used when the model directory has no processor config).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPScore(Objective):
    """``1 - cos(CLIP image embedding, CLIP text embedding)`` per sample; lower is better.

    Preprocessing is tensor-only and differentiable (no PIL in the graph): grayscale images are
    repeated to three channels, resized bicubically to the vision tower's input size and
    normalized with CLIP's statistics. Logs ``clip_score`` (the cosine) per sample.

    Args:
        model: a transformers ``CLIPModel`` directory or hub id
            (e.g. ``openai/clip-vit-large-patch14``).
        prompt: the text to match; None to read ``batch["prompt"]`` (one string per sample).
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
    """

    def __init__(self, model: str, prompt: str | None = None, local_files_only: bool | None = None) -> None:
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
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self._text_cache: dict[str, Tensor] = {}

    def preprocess(self, images: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` in [0, 1] -> CLIP pixel values, differentiably."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        images = F.interpolate(images, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

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
        cosine = (self.image_embeds(images) * self.text_embeds(prompts).to(images.dtype)).sum(-1)
        self.terms = {"clip_score": cosine.detach()}
        return 1 - cosine
