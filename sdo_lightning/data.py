"""Data modules: what each optimized sample is (its seed, conditioning and target)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset


def _per_sample(value: int | list[int] | None, n: int, fill: int) -> torch.Tensor:
    if value is None:
        return torch.full((n,), fill, dtype=torch.long)
    if isinstance(value, int):
        return torch.full((n,), value, dtype=torch.long)
    if not value:
        raise ValueError("an empty list of classes was given; give one class or a list to cycle through.")
    return torch.tensor([value[i % len(value)] for i in range(n)], dtype=torch.long)


def _load_images(source: str, n: int) -> torch.Tensor:
    if source == "digits":
        from sdo_lightning.digits import load_digits_images

        images = load_digits_images(16)[0]
    else:
        import numpy as np

        try:
            images = torch.from_numpy(np.load(source)["images"]).float()
        except (OSError, KeyError) as err:
            raise FileNotFoundError(f"images={source!r}: expected 'digits' or a .npz file with an 'images' array.") from err
    if len(images) < n:
        raise ValueError(f"images={source!r} holds {len(images)} images, fewer than num_samples={n}.")
    return images[:n]


class _Samples(Dataset):
    """The sample set repeated ``repeats`` times, so one epoch holds every optimizer step."""

    def __init__(self, columns: dict[str, torch.Tensor], repeats: int = 1) -> None:
        self.columns = columns
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.columns["index"]) * self.repeats

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = i % len(self.columns["index"])
        return {k: v[i] for k, v in self.columns.items()}


class SampleSet(LightningDataModule):
    """A set of samples to optimize, each one a seed, a class label and a target.

    Every optimizer step sees the whole set as one batch, so each sample's variables get one
    update per step (and Adam's state of one sample never moves another's).

    Args:
        num_samples: how many samples to optimize.
        class_label: conditioning class per sample: one class for all, a list cycled over the
            samples, or None for unconditional samples (the null class).
        target: target class per sample, for objectives that read ``batch["target"]``: one
            class, a list cycled over the samples, or None.
        prompt: text prompt per sample for text-conditioned backbones: one prompt for all, a
            list cycled over the samples, or None.
        images: real images to start from (``LatentOptimization(invert_images=True)`` inverts
            them with DDIM): ``digits`` for the bundled real digits (the first ``num_samples``,
            16x16), or a ``.npz`` file with an ``images`` array ``(N, C, H, W)`` in [0, 1].
        null_class: the label that means "no class".
    """

    def __init__(
        self,
        num_samples: int = 16,
        class_label: int | list[int] | None = None,
        target: int | list[int] | None = None,
        prompt: str | list[str] | None = None,
        images: str | None = None,
        null_class: int = 10,
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        self.num_samples = num_samples
        columns = {
            "index": torch.arange(num_samples),
            "class_label": _per_sample(class_label, num_samples, null_class),
        }
        if target is not None:
            columns["target"] = _per_sample(target, num_samples, null_class)
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            columns["prompt"] = [prompts[i % len(prompts)] for i in range(num_samples)]
        if images is not None:
            columns["image"] = _load_images(images, num_samples)
        self.dataset = _Samples(columns)

    def full_batch(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """All samples as one batch (what every training step sees), tensors on ``device``."""
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.dataset.columns.items()}

    def train_dataloader(self) -> DataLoader:
        # One batch per optimizer step, all in one epoch, so the progress bar counts steps.
        trainer = getattr(self, "trainer", None)
        max_steps = getattr(trainer, "max_steps", -1)
        batches = max_steps * getattr(trainer, "accumulate_grad_batches", 1)  # batches per optimizer step
        repeats = batches if max_steps and max_steps > 0 else 1
        dataset = _Samples(self.dataset.columns, repeats)
        return DataLoader(dataset, batch_size=self.num_samples, shuffle=False)
