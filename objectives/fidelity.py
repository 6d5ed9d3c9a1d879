"""Fidelity objectives: stay close to the unoptimized sample (or to a real image)."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from sdo_lightning.contracts import Objective


class L2Fidelity(Objective):
    """L2 distance between each image and a reference, per sample.

    Args:
        reduction: ``mse``: the mean squared difference over pixels (default); ``norm``: the
            Euclidean norm of the difference, ``||x_0 - x_ref||`` as in the paper's Eq. 23 (its
            gradient has unit size whatever the image size, so a weight means the same at 256 px
            as at 16 px).
        reference: the batch entry holding the reference images: ``initial_images`` (the
            unoptimized samples, which the LightningModules add) or e.g. ``image`` (the real
            images of a data module, which ``invert_images`` starts from).

    Logs ``l2``: the RMS difference per pixel, in [0, 1] units, whatever the reduction.
    """

    def __init__(self, reduction: Literal["mse", "norm"] = "mse", reference: str = "initial_images") -> None:
        super().__init__()
        if reduction not in ("mse", "norm"):
            raise ValueError(f"L2Fidelity reduction must be 'mse' or 'norm', got {reduction!r}.")
        self.reduction = reduction
        self.reference = reference

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        if self.reference not in batch:
            raise KeyError(f"L2Fidelity needs batch[{self.reference!r}] (its reference images); the batch has "
                           f"{sorted(batch)}.")
        ref = batch[self.reference].to(device=images.device, dtype=images.dtype)
        if ref.shape[1:] != images.shape[1:]:
            raise ValueError(f"L2Fidelity: reference images {tuple(ref.shape[1:])} differ in shape from the samples "
                             f"{tuple(images.shape[1:])}.")
        squared = (images - ref).pow(2).flatten(1)
        self.terms = {"l2": squared.detach().mean(1).sqrt()}
        if self.reduction == "norm":
            # sqrt with a floor: the gradient of a norm at zero difference is undefined
            return squared.sum(1).clamp_min(1e-12).sqrt()
        return squared.mean(1)


class L1Fidelity(Objective):
    """Mean absolute difference between each image and a reference, per sample.

    The fidelity term of the authors' released text-editing script: ``mean |x_0 - x_ref|`` over
    pixels, on images in [-1, 1]. Its gradient has the same size at every nonzero difference
    (``1 / (C * H * W)`` per pixel, times 2 on [-1, 1]), so a weight means less at larger
    images: against the paper config's ``L2Fidelity(reduction: norm)`` (a gradient of norm 1) it
    weighs ``2 / sqrt(C * H * W)`` as much, 1/222 at 3 x 256 x 256.

    Args:
        reference: the batch entry holding the reference images: ``initial_images`` (the
            unoptimized samples) or e.g. ``image`` (the real images of a data module).
        signed: measure on images mapped to [-1, 1] (``2 x - 1``), as the released script does
            (twice the [0, 1] value); False measures on [0, 1].

    Logs ``l1``: the mean absolute difference per pixel, in [0, 1] units, whatever ``signed``.
    """

    def __init__(self, reference: str = "initial_images", signed: bool = True) -> None:
        super().__init__()
        self.reference = reference
        self.signed = signed

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        if self.reference not in batch:
            raise KeyError(f"L1Fidelity needs batch[{self.reference!r}] (its reference images); the batch has "
                           f"{sorted(batch)}.")
        ref = batch[self.reference].to(device=images.device, dtype=images.dtype)
        if ref.shape[1:] != images.shape[1:]:
            raise ValueError(f"L1Fidelity: reference images {tuple(ref.shape[1:])} differ in shape from the samples "
                             f"{tuple(images.shape[1:])}.")
        if self.signed:
            diff = ((images * 2 - 1) - (ref * 2 - 1)).abs().flatten(1).mean(1)
            self.terms = {"l1": diff.detach() / 2}
            return diff
        diff = (images - ref).abs().flatten(1).mean(1)
        self.terms = {"l1": diff.detach()}
        return diff
