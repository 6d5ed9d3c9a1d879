"""A small, batch-independent CNN that classifies digit images."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _conv_block(in_ch: int, out_ch: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.GroupNorm(groups, out_ch), nn.SiLU())


class DigitClassifier(nn.Module):
    """Small CNN: images ``(B, 1, H, W)`` with values in [0, 1] -> logits ``(B, 10)``.

    It uses GroupNorm only (no BatchNorm), so every sample is processed independently of the
    others in its batch, and it is differentiable with respect to its input. Inputs whose spatial
    size differs from ``image_size`` are resized bilinearly (differentiably) first.
    """

    def __init__(
        self,
        image_size: int = 16,
        channels: tuple[int, ...] | list[int] = (32, 64),
        hidden: int = 128,
        num_classes: int = 10,
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        self.config = {
            "image_size": int(image_size),
            "channels": [int(c) for c in channels],
            "hidden": int(hidden),
            "num_classes": int(num_classes),
            "norm_groups": int(norm_groups),
        }
        layers: list[nn.Module] = []
        in_ch, res = 1, int(image_size)
        for ch in self.config["channels"]:
            layers += [_conv_block(in_ch, ch, norm_groups), _conv_block(ch, ch, norm_groups)]
            if res > 4:
                layers.append(nn.AvgPool2d(2))
                res //= 2
            in_ch = ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(in_ch * res * res, hidden), nn.SiLU(), nn.Linear(hidden, num_classes)
        )

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"DigitClassifier expects images of shape (B, 1, H, W), got {tuple(images.shape)}.")
        size = self.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        return self.head(self.features(images))

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory``."""
        from safetensors.torch import save_file

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, pretrained_directory: str | Path, device: str | torch.device | None = None) -> "DigitClassifier":
        """Load a classifier written by :meth:`save_pretrained`; it is returned in eval mode."""
        from safetensors.torch import load_file

        directory = Path(pretrained_directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not (config_path.is_file() and weights_path.is_file()):
            raise FileNotFoundError(
                f"No DigitClassifier weights at '{directory}' (expected {CONFIG_NAME} and {WEIGHTS_NAME})."
            )
        model = cls(**json.loads(config_path.read_text()))
        model.load_state_dict(load_file(str(weights_path)))
        if device is not None:
            model.to(device)
        return model.eval()
