"""Evaluation metrics of generated images, on torchmetrics: what ``sdo validate`` / ``sdo test``
report, and what periodic validation during ``sdo fit`` logs.

Every number is a torchmetrics ``Metric``, so it accumulates over batches and is synced across
processes (DDP) when computed. For a set of evaluation rows (fixed seeds and conditions) the
module generates images ``x`` with what it trained and ``y`` with the unoptimized model from the
same seeds; then:

    reward        mean of -objective(x)                  (MeanMetric; the optimized reward)
    held_out      mean of held_out_objective(x)          (MeanMetric; a loss, never optimized)
    psnr          10 log10(1 / MSE(x, y))                (MSE pooled over every pixel of the set)
    ssim          mean SSIM(x, y)                        (11x11 Gaussian window, sigma 1.5)
    lpips         mean LPIPS(x, y)                       (the project's LPIPSFidelity, when configured)
    fid / kid     distance between the feature distributions of {x} and {y}
    pixel_fid     the Frechet distance of the pixel distributions (images of at most 1024 pixels)
    diversity     mean pairwise L2 distance of the features of {x}   (base_diversity: of {y})
    clip_score    100 * max(cos(image, prompt), 0)       (the CLIP score's definition, when a CLIP is configured)

FID and KID take a feature extractor: the shipped digits classifier's penultimate layer for the
embedded digits model (``features: digits``), since torchmetrics' Inception default needs the
torch-fidelity package and downloaded weights. A fine-tuning run that collapses its samples onto
one image loses the reference's feature covariance, and FID grows with it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdo_lightning.contracts import Objective

#: the SSIM window (torchmetrics' default, Wang et al. 2004): 11 x 11, Gaussian sigma 1.5
SSIM_WINDOW = 11
#: torchmetrics' KID default subset size; smaller evaluation sets use all their samples
KID_SUBSET_SIZE = 50
#: evaluation rows FID and KID need: below this the estimates are noise (on 2 rows KID's unbiased
#: estimate came out at -270.7), so they are not reported, with a warning
MIN_DISTRIBUTION_ROWS = 4


class ClassifierFeatures(nn.Module):
    """The penultimate activations of a :class:`~sdo_lightning.digits.DigitClassifier` (after
    the hidden layer's SiLU, before the logits): a feature extractor for FID and KID on digits.

    Images ``(B, 1, H, W)`` in [0, 1] -> features ``(B, hidden)``; ``logits(images)`` gives the
    classes (for the class histogram).

    Args:
        path: a directory with a saved DigitClassifier; None for the one shipped with the
            embedded digits model.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        from sdo_lightning.digits import WEIGHTS_DIR, DigitClassifier

        root = Path(path) if path is not None else Path(WEIGHTS_DIR) / "classifier"
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"no digits classifier in {root} (expected config.json and model.safetensors) for "
                                    "the FID/KID features; give evaluation.features a classifier directory, 'digits' "
                                    "for the shipped one, or null to skip FID and KID.")
        self.classifier = DigitClassifier.from_pretrained(root).eval().requires_grad_(False)
        self.num_features = self.classifier.config["hidden"]  # torchmetrics reads this

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        return super().train(False)  # a frozen judge

    def _resized(self, images: Tensor) -> Tensor:
        size = self.classifier.image_size
        if images.shape[-2:] != (size, size):
            images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return images

    def forward(self, images: Tensor) -> Tensor:
        head = self.classifier.head
        return head[:-1](self.classifier.features(self._resized(images.float())))

    def logits(self, images: Tensor) -> Tensor:
        return self.classifier(images.float())


class PixelFeatures(nn.Module):
    """The pixels themselves as features (``(B, C*H*W)``): a distribution distance no trained
    network shapes, so a reward that fools the classifier cannot fool it too. For small images only."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.num_features = size

    def forward(self, images: Tensor) -> Tensor:
        return images.flatten(1).double()


#: the most pixels per image the pixel-space FID is computed for (its covariance is size x size)
PIXEL_FID_MAX = 1024


class Evaluation:
    """What validation, test and predict compute, and with which networks.

    Args:
        features: the feature extractor of FID, KID and diversity: ``digits`` for the shipped
            digits classifier, a directory of a saved DigitClassifier, ``auto`` (the shipped
            classifier for 1-channel images, none for others), or None to skip FID/KID
            (diversity is then measured on pixels). A classifier needs 1-channel images.
        lpips: an LPIPSFidelity objective (its VGG16 and LPIPS weight files) to report LPIPS to
            the unoptimized samples; None skips LPIPS.
        clip_model: a CLIP directory (transformers ``CLIPModel`` and tokenizer) for the CLIP
            score of images against their prompts; None skips it.
        kid_subset_size: samples per KID subset (at most the evaluation set's size).
        grid_size: how many of the evaluation images the TensorBoard grid shows.
        predict_base: ``sdo predict`` also samples the unoptimized model from the same seeds, as
            the grid's comparison rows and ``base`` in the arrays.
    """

    def __init__(
        self,
        features: str | None = "auto",
        lpips: Objective | None = None,
        clip_model: str | None = None,
        kid_subset_size: int = KID_SUBSET_SIZE,
        grid_size: int = 64,
        predict_base: bool = True,
    ) -> None:
        if kid_subset_size < 2:
            raise ValueError(f"evaluation.kid_subset_size must be >= 2, got {kid_subset_size}.")
        if grid_size < 1:
            raise ValueError(f"evaluation.grid_size must be >= 1, got {grid_size}.")
        self.features = features
        self.lpips = lpips
        self.clip_model = clip_model
        self.kid_subset_size = kid_subset_size
        self.grid_size = grid_size
        self.predict_base = predict_base

    def build(self, channels: int = 1) -> "SampleMetrics":
        """The metrics (fresh states) these settings describe, for images of ``channels`` channels."""
        extractor = None
        if self.features == "auto" and channels != 1:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"evaluation.features auto: no FID/KID feature extractor for {channels}-channel images "
                           "(torchmetrics' Inception needs torch-fidelity and downloaded weights); FID and KID are "
                           "skipped, diversity is measured on pixels.")
        elif self.features is not None:
            extractor = ClassifierFeatures(None if self.features in ("digits", "auto") else self.features)
        clip = load_clip_score(self.clip_model) if self.clip_model is not None else None
        return SampleMetrics(extractor, lpips=self.lpips, clip_score=clip, kid_subset_size=self.kid_subset_size)


def load_clip_score(path: str) -> nn.Module:
    """The project's :class:`~sdo_lightning.objectives.CLIPScore` on the CLIP saved in ``path``
    (offline): its cosine gives the CLIP score ``100 * max(cos, 0)``.

    Not torchmetrics' CLIPScore: in torchmetrics 1.9 it reads ``get_image_features`` as a tensor,
    which transformers 5 returns wrapped in an output object (AttributeError), and its processor
    wants torchvision.
    """
    from sdo_lightning.objectives import CLIPScore

    if not Path(path).is_dir():
        raise FileNotFoundError(f"evaluation.clip_model={path!r} is not a directory; give a saved CLIP (config.json, "
                                "weights, tokenizer files), or leave it unset to skip the CLIP score.")
    return CLIPScore(path, local_files_only=True).eval().requires_grad_(False)


def mean_pairwise_distance(features: Tensor) -> Tensor:
    """Mean L2 distance over the pairs of rows of ``(N, D)`` features (NaN for fewer than 2)."""
    if len(features) < 2:
        return torch.tensor(float("nan"))
    return torch.pdist(features.double()).mean()


class SampleMetrics(nn.Module):
    """The metrics of one evaluation set: ``update`` per batch, ``compute`` once, ``reset``.

    Args:
        features: an ``nn.Module`` mapping images to ``(B, D)`` features (FID, KID, diversity),
            with a ``num_features`` attribute; None skips FID and KID.
        lpips: an objective returning per-sample LPIPS to ``batch["initial_images"]``; None skips it.
        clip_score: a :class:`~sdo_lightning.objectives.CLIPScore` objective (its loss is
            ``1 - cos``) for the CLIP score of images and ``batch["prompt"]``; None skips it.
        kid_subset_size: samples per KID subset (clipped to the set's size).
    """

    def __init__(self, features: nn.Module | None = None, lpips: nn.Module | None = None,
                 clip_score: nn.Module | None = None, kid_subset_size: int = KID_SUBSET_SIZE) -> None:
        super().__init__()
        from torchmetrics import CatMetric, MeanMetric
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.reward = MeanMetric()
        self.held_out = MeanMetric()
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=SSIM_WINDOW, sigma=1.5)
        self.lpips_objective = lpips
        self.lpips = MeanMetric()
        self.clip_score = clip_score
        self.clip_mean = MeanMetric()
        self.features = features
        # the features of every sample, for diversity (CatMetric gathers them from all processes)
        self.sample_features = CatMetric()
        self.base_features = CatMetric()
        self.classes = CatMetric()
        self.fid = self.kid = None
        if features is not None:
            self.fid = FrechetInceptionDistance(feature=features, reset_real_features=True)
            with warnings.catch_warnings():  # it keeps every feature row: a few hundred here, by design
                warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
                self.kid = KernelInceptionDistance(feature=features, subsets=50, subset_size=kid_subset_size)
        self.kid_subset_size = kid_subset_size
        self.pixel_fid: nn.Module | None = None  # made for the first images small enough
        self._seen: set[str] = set()

    def _features(self, images: Tensor) -> Tensor:
        if self.features is None:
            return images.flatten(1).float()
        return self.features(images)

    def check_images(self, images: Tensor) -> None:
        if self.features is not None and isinstance(self.features, ClassifierFeatures) and images.shape[1] != 1:
            raise ValueError(f"evaluation.features 'digits' reads 1-channel digit images, but the model makes "
                             f"{images.shape[1]}-channel ones; set evaluation.features: null (no FID/KID) for this model.")

    @torch.no_grad()
    def update(self, images: Tensor, reference: Tensor | None, losses: Tensor | None = None,
               held_out: Tensor | None = None, batch: dict[str, Any] | None = None) -> None:
        """Add a batch: the generated ``images``, the unoptimized model's ``reference`` images of
        the same seeds (or None), the objective's per-sample ``losses`` and the held-out
        objective's (or None)."""
        self.check_images(images)
        images = images.float().clamp(0, 1)
        if losses is not None:
            self.reward.update(-losses.float())
            self._seen.add("reward")
        if held_out is not None:
            self.held_out.update(held_out.float())
            self._seen.add("held_out")
        self.sample_features.update(self._features(images).double())
        if isinstance(self.features, ClassifierFeatures):
            self.classes.update(self.features.logits(images).argmax(-1).double())
            self._seen.add("classes")
        if reference is None:
            return
        reference = reference.float().clamp(0, 1)
        self.base_features.update(self._features(reference).double())
        self.psnr.update(images, reference)
        self._seen.update({"psnr", "base"})
        if min(images.shape[-2:]) > SSIM_WINDOW // 2:  # the window's reflect padding needs this much
            self.ssim.update(images, reference)
            self._seen.add("ssim")
        size = images[0].numel()
        if size <= PIXEL_FID_MAX:
            if self.pixel_fid is None:
                from torchmetrics.image.fid import FrechetInceptionDistance

                with torch.inference_mode(False):
                    self.pixel_fid = FrechetInceptionDistance(feature=PixelFeatures(size)).to(images.device)
            self.pixel_fid.update(reference, real=True)
            self.pixel_fid.update(images, real=False)
            self._seen.add("pixel_fid")
        if self.fid is not None:
            self.fid.update(reference, real=True)
            self.fid.update(images, real=False)
            self.kid.update(reference, real=True)
            self.kid.update(images, real=False)
        if self.lpips_objective is not None:
            self.lpips.update(self.lpips_objective(images, {**(batch or {}), "initial_images": reference}).float())
            self._seen.add("lpips")
        if self.clip_score is not None and batch is not None and batch.get("prompt") is not None:
            prompts = [batch["prompt"]] if isinstance(batch["prompt"], str) else list(batch["prompt"])
            cosine = 1 - self.clip_score(images, {**batch, "prompt": prompts}).float()
            self.clip_mean.update(100 * cosine.clamp(min=0))
            self._seen.add("clip_score")

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        """Every metric that saw data, as plain floats (synced across processes)."""
        from sdo_lightning.progress import global_rng_unchanged

        out: dict[str, float] = {}
        if "reward" in self._seen:
            out["reward"] = float(self.reward.compute())
        if "held_out" in self._seen:
            out["held_out"] = float(self.held_out.compute())
        features = self.sample_features.compute()
        out["diversity"] = float(mean_pairwise_distance(features))
        if "classes" in self._seen:
            classes = self.classes.compute().long()
            counts = torch.bincount(classes, minlength=10).double()
            p = counts / counts.sum()
            out["class_entropy"] = float(-(p[p > 0] * p[p > 0].log()).sum()) + 0.0  # nats; log(10) = 2.30 is uniform
            out.update({f"class_{c}": float(p[c]) for c in range(len(p))})
        if "base" in self._seen:
            out["base_diversity"] = float(mean_pairwise_distance(self.base_features.compute()))
            out["psnr"] = float(self.psnr.compute())
            if "ssim" in self._seen:
                out["ssim"] = float(self.ssim.compute())
            n = len(features)
            enough = n >= MIN_DISTRIBUTION_ROWS
            if not enough and ("pixel_fid" in self._seen or self.fid is not None):
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"FID and KID need at least {MIN_DISTRIBUTION_ROWS} evaluation rows and got {n}, so they "
                               f"are not reported; give --data.eval_samples {MIN_DISTRIBUTION_ROWS} or more.")
            if "pixel_fid" in self._seen and enough:
                out["pixel_fid"] = float(self.pixel_fid.compute())
            if self.fid is not None and enough:
                out["fid"] = float(self.fid.compute())
                # KID draws random subsets: from a fixed seed, leaving the global generators alone
                self.kid.subset_size = min(self.kid_subset_size, n)
                # KID keeps a list of feature batches that its sync gathers one by one (no
                # reduction): processes with different batch counts would pair up the wrong
                # gathers. One tensor per process, gathered once, whatever its length.
                for name in ("real_features", "fake_features"):
                    rows = getattr(self.kid, name)
                    if isinstance(rows, list) and len(rows) > 1:
                        setattr(self.kid, name, [torch.cat(rows)])
                with global_rng_unchanged():
                    torch.manual_seed(0)
                    out["kid"] = float(self.kid.compute()[0])
        if "lpips" in self._seen:
            out["lpips"] = float(self.lpips.compute())
        if "clip_score" in self._seen:
            out["clip_score"] = float(self.clip_mean.compute())
        return out

    def reset(self) -> None:
        for metric in (self.reward, self.held_out, self.psnr, self.ssim, self.lpips, self.sample_features,
                       self.base_features, self.classes, self.fid, self.kid, self.clip_mean, self.pixel_fid):
            if metric is not None:
                metric.reset()
        self._seen = set()
