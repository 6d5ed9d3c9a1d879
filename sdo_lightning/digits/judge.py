"""An independent judge of digit images: a logistic regression on raw pixels, never optimized."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from sdo_lightning.contracts import Objective


@functools.cache
def _fit(image_size: int, max_iter: int) -> tuple[Tensor, Tensor]:
    """``(coef (10, image_size**2), intercept (10,))`` of scikit-learn's multinomial logistic
    regression fitted on the real digits at ``image_size`` (deterministic: lbfgs from zeros);
    fitted once per process."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from sdo_lightning.digits.data import load_digits_images

    images, labels = load_digits_images(image_size)
    # one BLAS thread: the same numbers, and 0.1 s instead of 10 s when the cores are shared
    with threadpool_limits(1):
        model = LogisticRegression(max_iter=max_iter).fit(images.flatten(1).double().numpy(), labels.numpy())
    return torch.from_numpy(model.coef_).double(), torch.from_numpy(model.intercept_).double()


class DigitsJudge(Objective):
    """``1 - p(target | x)`` under a multinomial logistic regression on raw pixels; lower is better.

    A second opinion on digit images that shares nothing with the shipped classifier the
    quickstart optimizes (a linear model of another family, fitted with scikit-learn on the 1797
    real digits resized to the images' size): as a ``held_out_objective`` it shows whether the
    optimized images became the target digit or only fool the classifier. Deterministic (no
    augmentation); computed in float64, returned in the images' dtype.

    Notation: ``x`` is an image flattened to ``S * S`` pixels in [0, 1], ``W``, ``b`` the fitted
    coefficients and intercepts of the 10 classes.

    1. ``W`` and ``b`` come from ``LogisticRegression(max_iter).fit`` on ``load_digits_images(S)``
       (lbfgs from zeros, so the same numbers every time), once per process and size ``S``: at
       construction for ``image_size``, else on the first images scored.
    2. ``p = softmax(W x + b)``, scikit-learn's ``predict_proba``.
    3. The loss is ``1 - p[target]``, the target being ``target_class`` or, when that is None,
       the batch's ``"target"``. Logs ``judge_prob`` (``p[target]``) per sample.

    Args:
        target_class: the digit to score; None to read it from ``batch["target"]``.
        image_size: the side ``S`` of the images to score (16 for the embedded digits models),
            fitted at construction; None to fit for the size of the first images scored (a
            second of CPU time at 16).
        max_iter: lbfgs iterations of the fit (it converges in about 150).
    """

    def __init__(self, target_class: int | None = None, image_size: int | None = None, max_iter: int = 5000) -> None:
        super().__init__()
        if target_class is not None and not 0 <= target_class <= 9:
            raise ValueError(f"DigitsJudge target_class must be a digit 0..9, got {target_class!r}.")
        if image_size is not None and image_size < 1:
            raise ValueError(f"DigitsJudge image_size must be >= 1 (the images' side in pixels), got {image_size!r}.")
        if max_iter < 1:
            raise ValueError(f"DigitsJudge max_iter must be >= 1 (lbfgs iterations of the fit), got {max_iter!r}.")
        self.target_class = target_class
        self.image_size = image_size
        self.max_iter = int(max_iter)
        if image_size is not None:
            _fit(int(image_size), self.max_iter)

    def probabilities(self, images: Tensor) -> Tensor:
        """``(B, 10)`` class probabilities of grey square ``images`` ``(B, 1, S, S)`` in [0, 1] (float64)."""
        size = images.shape[-1]
        if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != size or (
                self.image_size is not None and size != self.image_size):
            expected = f"(B, 1, {self.image_size}, {self.image_size})" if self.image_size else "(B, 1, S, S)"
            raise ValueError(f"DigitsJudge scores grey square digit images of shape {expected}, got "
                             f"{tuple(images.shape)}; set image_size to the model's image size (or null).")
        coef, intercept = _fit(int(size), self.max_iter)
        logits = images.flatten(1).double() @ coef.to(images.device).T + intercept.to(images.device)
        return logits.softmax(-1)

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        probs = self.probabilities(images)
        if self.target_class is not None:
            target = torch.full((len(images),), self.target_class, dtype=torch.long, device=images.device)
        elif "target" in batch:
            target = torch.as_tensor(batch["target"], device=images.device).long()
        else:
            raise KeyError("DigitsJudge has no target: set target_class or give the batch a 'target' (SampleSet target: 7).")
        if len(target) and not (0 <= int(target.min()) and int(target.max()) <= 9):
            raise ValueError(f"DigitsJudge: target classes must be digits 0..9, got {sorted(set(target.tolist()))}.")
        picked = probs.gather(1, target[:, None])[:, 0]
        self.terms = {"judge_prob": picked.detach().to(images.dtype)}
        return (1 - picked).to(images.dtype)
