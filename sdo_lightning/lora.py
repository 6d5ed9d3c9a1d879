"""LoRA adapters on a denoiser through peft: add, save, load, scale and combine.

Adapters are injected with ``peft.inject_adapter_in_model`` (no ``PeftModel`` wrapper, so the
denoiser keeps its own class and state-dict keys). Saved adapters use peft's file layout:
``adapter_config.json`` + ``adapter_model.safetensors`` with keys as ``get_peft_model_state_dict``
returns them (no ``base_model.model.`` prefix, since nothing is wrapped).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def add_lora(network: nn.Module, rank: int, alpha: float, target_modules: list[str], name: str = "default") -> list[nn.Parameter]:
    """Inject a LoRA adapter ``name`` into ``network``; return its (trainable) parameters.

    Every other parameter of ``network`` is frozen. The adapter starts as a no-op (B = 0).
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True)
    try:
        inject_adapter_in_model(config, network, adapter_name=name)
    except ValueError as err:
        modules = sorted({n.rsplit(".", 1)[-1] for n, m in network.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise ValueError(
            f"LoRA target_modules {list(target_modules)} match no layer of {type(network).__name__}; "
            f"choose among its Linear/Conv2d names, e.g. {modules[:12]}."
        ) from err
    network.requires_grad_(False)
    params = [p for n, p in network.named_parameters() if f".{name}." in n and "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    network._sdo_lora_config = config  # kept for saving
    return params


def lora_layers(network: nn.Module) -> Iterable[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return (m for m in network.modules() if isinstance(m, LoraLayer))


def lora_state_dict(network: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(network, adapter_name=name).items()}


def save_adapter(network: nn.Module, directory: str | Path, name: str = "default") -> Path:
    """Write adapter ``name`` of ``network`` in peft's layout; return the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = network._sdo_lora_config
    (directory / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2, default=list) + "\n")
    save_file(lora_state_dict(network, name), str(directory / WEIGHTS_NAME))
    return directory


def load_adapter(network: nn.Module, directory: str | Path, name: str) -> None:
    """Inject the adapter saved in ``directory`` into ``network`` under ``name`` and load its weights."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"no LoRA adapter in {directory} (expected {CONFIG_NAME} and {WEIGHTS_NAME}).")
    config = LoraConfig(**{k: v for k, v in json.loads((directory / CONFIG_NAME).read_text()).items()
                           if k in LoraConfig.__dataclass_fields__})
    inject_adapter_in_model(config, network, adapter_name=name)
    result = set_peft_model_state_dict(network, load_file(str(directory / WEIGHTS_NAME)), adapter_name=name)
    missing = [k for k in result.unexpected_keys if "lora_" in k]
    if missing:
        raise ValueError(f"adapter {directory} did not load into {type(network).__name__}: unexpected keys {missing[:3]}.")
    network.requires_grad_(False)


def set_adapter_scales(network: nn.Module, scales: dict[str, float]) -> None:
    """Activate the adapters named in ``scales`` together, each multiplied by its scale:
    ``theta + sum_i scale_i * (B_i A_i)`` (paper Fig. 13)."""
    for layer in lora_layers(network):
        present = [n for n in scales if n in layer.lora_A]
        layer.set_adapter(present)
        for n in present:
            layer.set_scale(n, scales[n])
        # set_adapter makes the active adapters trainable; mixing is for sampling only
        for n in present:
            for p in list(layer.lora_A[n].parameters()) + list(layer.lora_B[n].parameters()):
                p.requires_grad_(False)


class AdapterFolding:
    """Run no-grad network calls with the LoRA deltas folded into the base weights.

    A plain peft LoRA layer computes ``W x + s B A x``: two extra small matmuls per layer and
    call, which dominate for small networks and cost 1.7-2.4x sampling time on an SD UNet
    (DESIGN.md). For calls that keep no graph the same output is ``(W + s B A) x``: ``refresh``
    builds those merged weights once per optimizer step, ``fold(True)`` swaps them in (as
    separate tensors: the kept call's graph still holds the original ``W``, which in-place
    merging would corrupt and un-merging would make drift in bf16) and turns the adapter path
    off; ``fold(False)`` puts the original weights and the adapter path back.
    """

    def __init__(self, network: nn.Module, name: str = "default") -> None:
        self.name = name
        self.layers = [layer for layer in lora_layers(network) if name in layer.lora_A]
        self.base = [layer.get_base_layer()._parameters["weight"] for layer in self.layers]
        self.merged: list[nn.Parameter] = []
        self.folded = False

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the merged weights from the current adapters (call after each update)."""
        self.fold(False)
        self.merged = [
            nn.Parameter(w + layer.get_delta_weight(self.name).to(w.dtype), requires_grad=False)
            for layer, w in zip(self.layers, self.base)
        ]

    def fold(self, on: bool) -> None:
        if on == self.folded:
            return
        for layer, base, merged in zip(self.layers, self.base, self.merged or self.base):
            layer.get_base_layer()._parameters["weight"] = merged if on else base
            layer._disable_adapters = on  # peft's flag; enable_adapters() would also flip requires_grad
        self.folded = on
