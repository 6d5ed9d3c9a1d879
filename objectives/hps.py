"""Human Preference Score v2 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human choices."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdo_lightning.contracts import Objective
from sdo_lightning.objectives._inputs import as_rgb, load_state_dict, normalize, prompts_for, resize_longest_pad
from sdo_lightning.objectives.clip import CLIP_MEAN, CLIP_STD

CHECKPOINT_HOW = ("download HPS_v2_compressed.pt or HPS_v2.1_compressed.pt (`hf download xswu/HPSv2 "
                  "HPS_v2.1_compressed.pt`) and pass its path as checkpoint")


class HPSv2Score(Objective):
    """Negative HPSv2 score per sample: ``-cos(image embedding, text embedding)`` of the HPS model.

    HPSv2 is open_clip's ViT-H-14 with the weights of the HPS checkpoint; the score is the cosine
    of the normalized image and prompt embeddings (about 0.2-0.35 for typical images). HPSv2.1
    (``HPS_v2.1_compressed.pt``, the later release) is the same architecture in the same file
    layout, so either file works: both hold the model's open_clip weights under ``"state_dict"``,
    as HPSv2's own scorer loads them (a ``module.`` prefix, as DDP training saves, is removed). Needs
    open_clip: ``pip install 'sdo-lightning[hps]'``. Preprocessing is tensor-only and follows
    HPSv2's evaluation transform: grayscale to RGB, bicubic resize of the long side to the model's
    input size, black padding of the short side to a square (nothing is cropped), normalization
    with its mean/std. Prompt embeddings are cached. Logs ``hps`` per sample.

    Args:
        checkpoint: ``HPS_v2_compressed.pt`` (HPSv2) or ``HPS_v2.1_compressed.pt`` (HPSv2.1) from the
            hub repo ``xswu/HPSv2``.
        prompt: the text to score against; None to read ``batch["prompt"]`` (one string per sample).
        arch: the open_clip architecture the checkpoint belongs to.
    """

    def __init__(self, checkpoint: str | os.PathLike, prompt: str | None = None, arch: str = "ViT-H-14") -> None:
        super().__init__()
        try:
            import open_clip
        except ImportError:
            raise ModuleNotFoundError("HPSv2Score needs open_clip; install it with `pip install 'sdo-lightning[hps]'` "
                                      f"and {CHECKPOINT_HOW}.") from None
        state = load_state_dict(checkpoint, "HPSv2 checkpoint", CHECKPOINT_HOW)
        if state and all(key.startswith("module.") for key in state):  # saved from a DDP-wrapped model
            state = {key[len("module."):]: value for key, value in state.items()}
        # No pretrained tag: the HPS checkpoint holds every weight of the model.
        self.model = open_clip.create_model(arch, pretrained=None)
        missing = self.model.load_state_dict(state, strict=False).missing_keys
        if missing:
            raise ValueError(f"HPSv2 checkpoint {str(checkpoint)!r} lacks {len(missing)} weights of open_clip {arch} "
                             f"(e.g. {missing[0]!r}); {CHECKPOINT_HOW}.")
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.prompt = prompt
        visual = self.model.visual
        size = getattr(visual, "image_size", 224)
        self.size = size if isinstance(size, int) else size[0]
        self.mean = tuple(getattr(visual, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(getattr(visual, "image_std", None) or CLIP_STD)
        self._text_cache: dict[str, Tensor] = {}

    def image_embeds(self, images: Tensor) -> Tensor:
        dtype = next(self.model.visual.parameters()).dtype
        pixels = normalize(resize_longest_pad(as_rgb(images), self.size), self.mean, self.std).to(dtype)
        return F.normalize(self.model.encode_image(pixels).to(images.dtype), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            device = next(self.model.parameters()).device
            embeds = F.normalize(self.model.encode_text(self.tokenizer(missing).to(device)), dim=-1)
            self._text_cache.update(zip(missing, embeds))
        return torch.stack([self._text_cache[p] for p in prompts])

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        prompts = prompts_for("HPSv2Score", self.prompt, batch, len(images))
        score = (self.image_embeds(images) * self.text_embeds(prompts).to(images)).sum(-1)
        self.terms = {"hps": score.detach()}
        return -score
