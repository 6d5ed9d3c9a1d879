"""Classifier objectives: push samples towards a class, or away from their own."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdo_lightning.contracts import Objective


class ClassifierObjective(Objective):
    """Negative log-probability of a target class under an image classifier.

    Targeted (default): loss ``-log p(target | x)``, the target being ``target_class`` or, when
    that is None, the batch's ``"target"`` entry. Untargeted: loss ``log p(source | x)``, where the
    source class is what the classifier says of the unoptimized sample (``batch["initial_images"]``).
    Logs ``target_prob`` (or ``source_prob``) per sample.

    Args:
        path: directory of a :class:`~sdo_lightning.digits.DigitClassifier`; None for the one
            shipped with the embedded digits model.
        target_class: the class to reach; None to read it from the batch.
        untargeted: move away from the unoptimized sample's class instead.
        augment: average the log-probability over this many randomly shifted, noised copies of
            each image (0 = off). Features that survive a one-pixel shift and pixel noise are
            stroke shapes, not the pixel-exact patterns that fool a single classifier pass.
        noise_std: standard deviation of the pixel noise of the augmented copies.
    """

    def __init__(
        self,
        path: str | None = None,
        target_class: int | None = None,
        untargeted: bool = False,
        augment: int = 0,
        noise_std: float = 0.1,
    ) -> None:
        super().__init__()
        from sdo_lightning.digits import WEIGHTS_DIR, DigitClassifier

        self.classifier = DigitClassifier.from_pretrained(path if path is not None else WEIGHTS_DIR / "classifier")
        self.classifier.eval().requires_grad_(False)
        self.target_class = target_class
        self.untargeted = untargeted
        self.augment = augment
        self.noise_std = noise_std

    def _log_probs(self, images: Tensor) -> Tensor:
        if not self.augment:
            return F.log_softmax(self.classifier(images), dim=-1)
        copies = []
        for _ in range(self.augment):
            dx, dy = torch.randint(-1, 2, (2,)).tolist()
            shifted = torch.roll(images, shifts=(dy, dx), dims=(-2, -1))
            copies.append(shifted + self.noise_std * torch.randn_like(images))
        log_probs = F.log_softmax(self.classifier(torch.cat(copies)), dim=-1)
        return log_probs.view(self.augment, len(images), -1).mean(0)

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        log_probs = self._log_probs(images)
        if self.untargeted:
            if "initial_images" not in batch:
                raise KeyError("untargeted ClassifierObjective needs batch['initial_images'] (the unoptimized samples).")
            with torch.no_grad():
                source = self.classifier(batch["initial_images"]).argmax(-1)
            picked = log_probs.gather(1, source[:, None])[:, 0]
            self.terms = {"source_prob": picked.detach().exp()}
            return picked
        if self.target_class is not None:
            target = torch.full((len(images),), self.target_class, dtype=torch.long, device=images.device)
        elif "target" in batch:
            target = torch.as_tensor(batch["target"], device=images.device).long()
        else:
            raise KeyError("ClassifierObjective has no target: set target_class or give the batch a 'target'.")
        classes = log_probs.shape[-1]
        if len(target) and not (0 <= int(target.min()) and int(target.max()) < classes):
            raise ValueError(f"ClassifierObjective: target classes must be in 0..{classes - 1}, got "
                             f"{sorted(set(target.tolist()))}.")
        picked = log_probs.gather(1, target[:, None])[:, 0]
        self.terms = {"target_prob": picked.detach().exp()}
        return -picked
