"""Loading diffusers models with one-sentence errors, and the diffusers conventions the
backbones share (learned-sigma outputs, VAE scaling and shift factors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdo_lightning._hub import offline
from sdo_lightning.backbones.base import unit_range, vae_decode, vae_encode  # noqa: F401 (also imported from here)

__all__ = ["offline", "load_failed", "load_pipeline", "save_pipeline_lora", "from_subfolder_or_root", "torch_dtype", "scheduler_config", "epsilon_only", "epsilon_half",
           "vae_decode", "vae_encode", "load_t5_tokenizer"]


def load_failed(what: str, model: str, err: Exception) -> FileNotFoundError:
    """One sentence for a model that did not load: a local path that holds no pipeline, or a hub
    id that is neither cached nor reachable."""
    local = (model.startswith((".", "~")) or Path(model).is_absolute() or model.count("/") > 1
             or Path(model).expanduser().exists())
    if local:
        how = ("no diffusers pipeline is there: check the path, or download one into it with "
               f"`hf download <hub id> --local-dir {model}`")
    else:
        how = (f"it is not in the local cache and could not be fetched from the hub (offline, or no such repository): "
               f"fetch it with network access (`hf download {model}`) or give a local pipeline directory")
    # the first clause of the original message, so the whole error stays one sentence
    detail = (str(err).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")[:200]
    return FileNotFoundError(f"could not load the {what} from {model!r} ({type(err).__name__}: {detail}); {how}.")


def load_pipeline(pipeline_cls: Any, model: str, what: str, *, local_files_only: bool | None,
                  revision: str | None = None, variant: str | None = None, dtype: str | None = None,
                  lora: str | None = None, errors: tuple[type[Exception], ...] = (OSError, ValueError),
                  **kwargs: Any) -> Any:
    """``pipeline_cls.from_pretrained(model)`` with the hub options (``HF_HUB_OFFLINE`` honoured),
    the weights' dtype by name, a one-sentence error naming what to fetch when it does not load,
    and optional LoRA weights (a directory or file in diffusers' format, e.g. LCM-LoRA) fused in."""
    hub = {"local_files_only": offline(local_files_only), "revision": revision}
    weights_dtype = torch_dtype(dtype)
    try:
        pipe = pipeline_cls.from_pretrained(model, variant=variant, **hub, **kwargs,
                                            **({"torch_dtype": weights_dtype} if weights_dtype else {}))
    except errors as err:
        raise load_failed(what, model, err) from None
    if lora is not None:
        pipe.load_lora_weights(lora, local_files_only=hub["local_files_only"])
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return pipe


def save_pipeline_lora(pipeline_cls: Any, network: nn.Module, directory: str | Path, component: str) -> Path:
    """Write ``network``'s LoRA adapter as ``pipeline_cls.save_lora_weights`` lays it out for
    ``component`` (``"unet"`` or ``"transformer"``), loadable by ``pipeline.load_lora_weights``.

    UNet adapters are converted to diffusers' key layout; transformer adapters keep peft's, as
    diffusers' training scripts save them. The metadata carries lora_alpha: without it diffusers
    loads the adapter at alpha = rank.
    """
    from sdo_lightning.lora import lora_state_dict

    layers = lora_state_dict(network)
    if component == "unet":
        from diffusers.utils import convert_state_dict_to_diffusers

        layers = convert_state_dict_to_diffusers(layers)
    directory = Path(directory)
    pipeline_cls.save_lora_weights(directory, **{f"{component}_lora_layers": layers,
                                                 f"{component}_lora_adapter_metadata": network._sdo_lora_config.to_dict()})
    return directory


def from_subfolder_or_root(load: Any, model: str, subfolder: str, **kwargs: Any) -> Any:
    """``load(model, subfolder=...)``, falling back to the top level of ``model`` (a lone
    ``save_pretrained`` layout); the subfolder's error is the one raised when both fail."""
    try:
        return load(model, subfolder=subfolder, **kwargs)
    except OSError as first:
        try:
            return load(model, **kwargs)
        except OSError:
            raise first from None


def torch_dtype(name: str | None) -> torch.dtype | None:
    """``torch.bfloat16`` for ``"bfloat16"`` and so on; None for None."""
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype; use e.g. bfloat16, float16 or float32.")
    return dtype


def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """A pipeline scheduler's config as a dict that names its class (``_class_name``), which a
    scheduler built in memory does not record until it is saved."""
    return {**dict(scheduler.config), "_class_name": type(scheduler).__name__}


def epsilon_only(scheduler_config: dict[str, Any]) -> dict[str, Any]:
    """The scheduler config for a denoiser that returns epsilon only.

    Learned-sigma models declare ``variance_type: learned(_range)``; diffusers schedulers then
    read the first 3 channels (DPM-Solver) or split the output in two (DDPM). The backbones hand
    on the epsilon half alone, so the variance type must not reach the solver.
    """
    config = dict(scheduler_config)
    if config.get("variance_type") in ("learned", "learned_range"):
        del config["variance_type"]
    return config


def epsilon_half(out: Tensor, channels: int) -> Tensor:
    """The epsilon half of a learned-sigma output (``2 * channels`` channels: epsilon, variance)."""
    return out[:, :channels] if out.shape[1] == 2 * channels else out


def load_t5_tokenizer(model: str, what: str = "PixArt-alpha pipeline", **hub: Any) -> Any:
    """The pipeline's tokenizer through transformers' Auto classes: a ``tokenizer.json`` loads as
    it is; a sentencepiece ``spiece.model`` (what real PixArt repos ship) needs sentencepiece."""
    from importlib.util import find_spec

    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, subfolder="tokenizer", **hub)
    except OSError as err:
        raise load_failed(what, model, err) from None
    except (ImportError, ValueError) as err:
        # Without sentencepiece, transformers fails on spiece.model with a misleading error (it
        # falls back to reading the file as a tiktoken vocabulary).
        if find_spec("sentencepiece") is None:
            raise ImportError(
                f"the tokenizer of {model!r} is a sentencepiece model, which needs the sentencepiece package: "
                "`pip install sentencepiece`."
            ) from err
        raise
