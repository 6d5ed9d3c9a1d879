"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on the human choices of Pick-a-Pic."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sdo_lightning.objectives._inputs import prompts_for
from sdo_lightning.objectives.clip import CLIPScore

HUB_ID = "yuvalkirstain/PickScore_v1"


class PickScore(CLIPScore):
    """Negative PickScore per sample: ``-(exp(logit_scale) * cos(image embedding, text embedding))``.

    PickScore is a transformers ``CLIPModel`` (ViT-H-14) fine-tuned to predict which of two images
    people preferred for a prompt; its reward is the model's own logit, the cosine of the image and
    prompt embeddings times ``exp(logit_scale)`` (about 100, so scores are around 20). The model,
    its tokenizer and its ``preprocessor_config.json`` are read from ``model`` as
    :class:`~sdo_lightning.objectives.CLIPScore` reads them, and images are preprocessed by
    CLIPScore's tensor-only, differentiable transform (see
    :func:`~sdo_lightning.objectives.clip.clip_preprocessing`); a directory without a processor
    config gets CLIP's 224-pixel transform, which is what the processor the authors' example loads
    (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) does. Prompt embeddings are cached. Logs
    ``pickscore`` per sample.

    Args:
        model: a transformers ``CLIPModel`` directory, or the hub id (fetch it first with
            ``hf download yuvalkirstain/PickScore_v1`` to work offline).
        prompt: the text to score against; None to read ``batch["prompt"]`` (one string per sample).
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
    """

    def __init__(self, model: str = HUB_ID, prompt: str | None = None, local_files_only: bool | None = None) -> None:
        try:
            super().__init__(model, prompt, local_files_only)
        except FileNotFoundError as err:
            cause = type(err.__cause__ or err).__name__
            raise FileNotFoundError(
                f"could not load PickScore's CLIP model and tokenizer from {model!r} ({cause}); fetch them with "
                f"`hf download {HUB_ID}` (the hub id then loads from the cache, also offline) or give a directory "
                "that holds them."
            ) from None

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        prompts = prompts_for("PickScore", self.prompt, batch, len(images))
        cosine = (self.image_embeds(images) * self.text_embeds(prompts).to(images.dtype)).sum(-1)
        score = self.clip.logit_scale.exp().to(images.dtype) * cosine
        self.terms = {"pickscore": score.detach()}
        return -score
