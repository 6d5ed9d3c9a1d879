"""Shared by the objectives that wrap pretrained networks: differentiable tensor preprocessing,
and loading of weight files and reference images with one-sentence errors.

Everything that touches the optimized images here is a torch op (no PIL in the graph); PIL
only reads reference images from disk, once, outside the graph.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sdo_lightning._hub import offline

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TENSOR_SUFFIXES = (".npz", ".npy", ".pt", ".pth")


offline_default = offline  # ``local_files_only`` as given, or implied by ``HF_HUB_OFFLINE``


def prompts_for(owner: str, prompt: str | None, batch: dict[str, Any], n: int) -> list[str]:
    """One prompt per sample: the objective's fixed ``prompt``, else ``batch["prompt"]`` (one
    string for all, or one per sample)."""
    if prompt is not None:
        return [prompt] * n
    if "prompt" not in batch:
        raise KeyError(f"{owner} has no text: set prompt or give the batch a 'prompt' per sample.")
    return [batch["prompt"]] * n if isinstance(batch["prompt"], str) else list(batch["prompt"])


def as_rgb(images: Tensor) -> Tensor:
    """Repeat a single channel to three; other channel counts pass unchanged."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def resize_center_crop(images: Tensor, crop: int, resize: int | tuple[int, int] | None = None,
                       mode: str = "bicubic") -> Tensor:
    """Resize so the short side is ``resize`` (default ``crop``), then center-crop ``crop x crop``.

    The tensor version of the usual eval transform (``Resize(resize)`` + ``CenterCrop(crop)``):
    ``mode`` is ``"bicubic"`` or ``"bilinear"``, with antialiasing, so a downscale averages like
    PIL's instead of aliasing. The long side is ``int(resize * long / short)``, floored as
    torchvision's ``Resize`` and transformers' image processors compute it (rounding instead
    shifts the crop by half a pixel); the crop starts at ``(side - crop) // 2`` as transformers'
    ``center_crop`` does (torchvision's ``CenterCrop`` rounds the half margin instead). A
    ``(height, width)`` pair as ``resize`` resizes to exactly that size.
    """
    resize = crop if resize is None else resize
    h, w = images.shape[-2:]
    if isinstance(resize, (tuple, list)):
        size = (max(crop, int(resize[0])), max(crop, int(resize[1])))
    else:
        short, long = int(resize), int(resize * max(h, w) / min(h, w))
        size = (max(crop, short), max(crop, long)) if h <= w else (max(crop, long), max(crop, short))
    if size != (h, w):
        # bf16/fp16 in float32: antialiased interpolation has no half-precision kernel on CPU
        work = images if images.dtype in (torch.float32, torch.float64) else images.float()
        images = F.interpolate(work, size=size, mode=mode, align_corners=False, antialias=True).to(images.dtype)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    return images[..., top:top + crop, left:left + crop]


def plain_resize(images: Tensor, size: int, mode: str) -> Tensor:
    """``F.interpolate`` straight to ``size x size`` (``mode`` ``bilinear`` or ``bicubic``), without
    antialiasing or a crop: what the authors' released scripts feed CLIP (a square image in, so
    nothing is distorted). Downscaling this way aliases; the ``processor`` path does not."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    work = images if images.dtype in (torch.float32, torch.float64) else images.float()
    return F.interpolate(work, size=(size, size), mode=mode, align_corners=False).to(images.dtype)


def resize_longest_pad(images: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """Resize so the long side is ``size`` (antialiased), then zero-pad the short side to a
    centered ``size x size`` square (open_clip's ``ResizeMaxSize``, which HPSv2 evaluates with)."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new = (round(h * scale), round(w * scale))
    if new != (h, w):
        work = images if images.dtype in (torch.float32, torch.float64) else images.float()
        images = F.interpolate(work, size=new, mode=mode, align_corners=False, antialias=True).to(images.dtype)
    pad_h, pad_w = size - new[0], size - new[1]
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(images - mean) / std`` per channel, in the images' dtype and device."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def require_file(path: str | os.PathLike, what: str, how: str) -> Path:
    """``Path(path)`` if it is a file, else a one-sentence FileNotFoundError saying ``how`` to get it."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found; {how}.")
    return file


def load_state_dict(path: str | os.PathLike, what: str, how: str) -> dict[str, Tensor]:
    """A state dict from a ``.pth``/``.pt``/``.bin``/``.ckpt`` or ``.safetensors`` file.

    Unwraps the ``"state_dict"`` / ``"model"`` entry that training checkpoints put around it.
    """
    file = require_file(path, what, how)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated download, an HTML error page saved as .pth, ...
        raise ValueError(f"{what} {str(path)!r} is not a readable weights file ({type(err).__name__}); "
                         f"{how}.") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what} {str(path)!r} holds no state dict of tensors; {how}.")
    return state


def load_image(path: str | os.PathLike, what: str = "reference image") -> Tensor:
    """An image file or saved tensor as one ``(1, C, H, W)`` image: uint8 pixels as stored, or floats in [0, 1].

    PNG/JPG/WEBP/BMP files are read with PIL (as RGB); ``.npz``/``.npy`` arrays and ``.pt``
    tensors may be ``(H, W, C)`` uint8, or float ``(C, H, W)`` / ``(1, C, H, W)`` in [0, 1]
    (an ``.npz`` uses its ``"image"`` entry, else its first array). 8-bit pixels stay uint8 so
    that :func:`image_like` converts them exactly to whatever dtype the objective runs in.
    """
    file = require_file(path, what, f"give the path of a {'/'.join(s[1:] for s in IMAGE_SUFFIXES + TENSOR_SUFFIXES)} file")
    suffix = file.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        import numpy as np
        from PIL import Image

        try:
            with Image.open(file) as img:
                array = np.asarray(img.convert("RGB"))
        except Exception as err:  # truncated or not an image
            raise ValueError(f"{what} {str(path)!r} is not a readable image ({type(err).__name__}); give a "
                             "PNG/JPG file or a saved tensor.") from None
        tensor = torch.from_numpy(array.copy())
    elif suffix in (".npz", ".npy"):
        import numpy as np

        data = np.load(file)
        if isinstance(data, np.lib.npyio.NpzFile):
            data = data["image"] if "image" in data.files else data[data.files[0]]
        tensor = torch.from_numpy(np.asarray(data).copy())
    elif suffix in (".pt", ".pth"):
        tensor = torch.load(file, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{what} {str(path)!r} has an unknown suffix {suffix!r}; give one of "
                         f"{', '.join(IMAGE_SUFFIXES + TENSOR_SUFFIXES)}.")
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{what} {str(path)!r} holds a {type(tensor).__name__}, not an image tensor; save one tensor.")
    if tensor.dtype == torch.uint8:  # (H, W, C) pixels, as image files and numpy arrays store them
        tensor = (tensor if tensor.ndim == 3 else tensor[..., None]).permute(2, 0, 1)
    elif not tensor.is_floating_point():
        raise ValueError(f"{what} {str(path)!r} has dtype {tensor.dtype}; give uint8 pixels or floats in [0, 1].")
    while tensor.ndim < 4:
        tensor = tensor[None]
    if tensor.ndim != 4 or tensor.shape[0] != 1 or tensor.shape[1] not in (1, 3):
        raise ValueError(f"{what} {str(path)!r} has shape {tuple(tensor.shape)}; expected one image "
                         "(C, H, W) or (1, C, H, W) with 1 or 3 channels, or uint8 (H, W, C).")
    return tensor.contiguous()


def image_like(image: Tensor, like: Tensor) -> Tensor:
    """A :func:`load_image` tensor as floats in [0, 1] on ``like``'s device and dtype."""
    if image.dtype == torch.uint8:
        return image.to(device=like.device, dtype=like.dtype) / 255
    return image.to(like)
