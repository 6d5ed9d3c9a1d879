"""Tiny stand-ins for the pretrained networks of the paper's objectives, saved in the users' file layouts.

- VGG16-shaped weights under torchvision's ``features.N.*`` keys (narrow channels) and LPIPS
  ``lin{l}.model.1.weight`` files;
- aesthetic predictor heads with the improved / linear predictors' keys;
- fake ``torchvision.models``, ``timm`` and ``open_clip`` modules (those packages are not
  installed here) that hand out small real ``nn.Module`` networks through the same API calls
  the objectives make.
"""

from __future__ import annotations

import enum
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# torchvision vgg16().features: the conv indices of the five blocks
VGG16_BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))


def vgg16_state(widths=(4, 6, 8, 8, 8), seed: int = 0) -> dict[str, torch.Tensor]:
    """A narrow VGG16 feature stack's state dict (He-initialized, small positive biases), plus a
    classifier entry as in torchvision's full-model file (LPIPS must ignore it)."""
    g = torch.Generator().manual_seed(seed)
    state, channels = {}, 3
    for block, width in zip(VGG16_BLOCKS, widths):
        for index in block:
            state[f"features.{index}.weight"] = torch.randn(width, channels, 3, 3, generator=g) * (2 / (9 * channels)) ** 0.5
            state[f"features.{index}.bias"] = 0.05 + 0.05 * torch.rand(width, generator=g)
            channels = width
    state["classifier.0.weight"] = torch.randn(10, channels, generator=g)
    return state


def lpips_lin_state(widths=(4, 6, 8, 8, 8), seed: int = 1) -> dict[str, torch.Tensor]:
    """LPIPS's non-negative 1x1 linear weights, one per tap, under the lpips package's keys."""
    g = torch.Generator().manual_seed(seed)
    return {f"lin{l}.model.1.weight": torch.rand(1, w, 1, 1, generator=g) for l, w in enumerate(widths)}


def aesthetic_state(kind: str, dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An aesthetic head: ``improved`` (layers 0, 2, 4, 6, 7: dim-12-10-6-4-1) or ``linear`` (dim-1)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        return {"weight": torch.randn(1, dim, generator=g), "bias": torch.randn(1, generator=g)}
    widths = (dim, 12, 10, 6, 4, 1)
    state = {}
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:])):
        state[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
        state[f"layers.{i}.bias"] = torch.randn(n_out, generator=g) * 0.1
    return state


class TinyClassifier(nn.Module):
    """Conv (stride 2) -> tanh -> global mean -> linear: smooth, so finite differences are clean."""

    def __init__(self, num_classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).mean((-2, -1)))


def install_fake_torchvision(monkeypatch, crop=16, resize=20, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)):
    """``torchvision.models`` with one model, ``tinynet``, whose IMAGENET1K_V1 weights are seed 7.

    Returns the record of ``get_model`` calls: ``(name, weights)`` pairs.
    """
    calls: list[tuple[str, object]] = []

    class TinyNet_Weights(enum.Enum):
        IMAGENET1K_V1 = "v1"
        DEFAULT = "v1"  # an alias, as torchvision's enums have

        def transforms(self):
            return types.SimpleNamespace(crop_size=[crop], resize_size=[resize], mean=list(mean), std=list(std),
                                         interpolation=types.SimpleNamespace(value="bilinear"))

    def get_model_weights(name):
        if name != "tinynet":
            raise ValueError(f"Unknown model {name}")
        return TinyNet_Weights

    def get_model(name, weights=None):
        calls.append((name, weights))
        get_model_weights(name)
        return TinyClassifier(seed=7 if weights is not None else 99)

    models = types.ModuleType("torchvision.models")
    models.get_model, models.get_model_weights = get_model, get_model_weights
    package = types.ModuleType("torchvision")
    package.models = models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return calls


def install_fake_timm(monkeypatch, cfg=None):
    """``timm.create_model`` for ``tinynet``: pretrained weights are seed 11, unpretrained seed 99."""
    calls: list[tuple[str, bool]] = []

    def create_model(name, pretrained=False):
        calls.append((name, pretrained))
        if name.split(".")[0] != "tinynet":
            raise RuntimeError(f"Unknown model ({name})")
        net = TinyClassifier(seed=11 if pretrained else 99)
        net.pretrained_cfg = dict(cfg if cfg is not None else
                                  {"input_size": (3, 16, 16), "crop_pct": 0.8, "mean": (0.45, 0.5, 0.55), "std": (0.3, 0.2, 0.25)})
        return net

    timm = types.ModuleType("timm")
    timm.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", timm)
    return calls


class TinyVisual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 6, 4, stride=4)
        self.proj = nn.Linear(6, dim)
        self.image_size = 16
        self.image_mean = (0.4, 0.45, 0.5)
        self.image_std = (0.25, 0.3, 0.2)

    def forward(self, x):
        return self.proj(torch.tanh(self.patch(x)).mean((-2, -1)))


class TinyOpenCLIP(nn.Module):
    """open_clip's CLIP surface the HPS objective uses: ``visual`` (with its preprocessing
    attributes), ``encode_image``, ``encode_text``."""

    def __init__(self, dim: int = 8, vocab: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.visual = TinyVisual(dim)
        self.token_embedding = nn.Embedding(vocab, dim)
        self.text_proj = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(4.6))

    def encode_image(self, x, normalize: bool = False):
        out = self.visual(x)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, tokens, normalize: bool = False):
        out = self.text_proj(self.token_embedding(tokens).mean(1))
        return F.normalize(out, dim=-1) if normalize else out


def tiny_tokenize(texts, length: int = 12, vocab: int = 64) -> torch.Tensor:
    """Characters to ids (mod ``vocab``), zero-padded to ``length``."""
    rows = [[ord(c) % vocab for c in text[:length]] + [0] * (length - len(text[:length])) for text in texts]
    return torch.tensor(rows, dtype=torch.long)


def install_fake_open_clip(monkeypatch):
    """``open_clip`` whose ``create_model`` builds a seed-0 TinyOpenCLIP; records the calls and tokenized texts."""
    record = {"create": [], "tokenized": []}

    def create_model(arch, pretrained=None):
        record["create"].append((arch, pretrained))
        return TinyOpenCLIP(seed=0)

    def get_tokenizer(arch):
        def tokenize(texts):
            record["tokenized"].extend(texts)
            return tiny_tokenize(texts)
        return tokenize

    open_clip = types.ModuleType("open_clip")
    open_clip.create_model, open_clip.get_tokenizer = create_model, get_tokenizer
    monkeypatch.setitem(sys.modules, "open_clip", open_clip)
    return record


def save(state, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def build_tiny_clip_vision(root: Path, seed: int = 0) -> Path:
    """A vision-only transformers CLIPVisionModel whose token count (9 patches) differs from its width (12)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=12, intermediate_size=24, num_attention_heads=2, num_hidden_layers=3,
                              image_size=24, patch_size=8)
    CLIPVisionModel(config).save_pretrained(root)
    return root
