"""LoRA adapters on a denoiser through peft: add, save, load, scale and combine.

Adapters are injected with ``peft.inject_adapter_in_model`` (no ``PeftModel`` wrapper, so the
denoiser keeps its own class and state-dict keys). Saved adapters use peft's file layout, as
``PeftModel.save_pretrained`` writes it: ``adapter_config.json`` + ``adapter_model.safetensors``
with keys as a ``PeftModel`` has them (``base_model.model.`` + the network's key), so
``PeftModel.from_pretrained(network, directory)`` loads them. Files of earlier releases, without
the prefix, still load here.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: what ``PeftModel`` puts before the wrapped network's keys (its ``base_model`` is a LoraModel
#: whose ``model`` is the network)
PEFT_PREFIX = "base_model.model."


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
    # PeftModel's key names, so that PeftModel.from_pretrained(network, directory) loads them
    state = {PEFT_PREFIX + k: v for k, v in lora_state_dict(network, name).items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` adapter file, with peft's ``base_model.model.`` prefix
    removed; a file that is not one (random bytes, truncated, empty, a link to something else)
    or holds NaN or infinite weights ends in one sentence (ValueError)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = load_file(str(path))
    except Exception as err:  # SafetensorError, OSError: truncated, random bytes, a directory behind a link
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise ValueError(f"adapter weights {str(path)!r} could not be read ({reason}): the file is damaged or not a "
                         "safetensors file; export the adapter again (or use the run's checkpoint).") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ValueError(f"adapter weights {str(path)!r} hold NaN or infinite values ({bad}): the fit that wrote them "
                         "diverged; use an adapter exported before it did, or fit again with a lower lr.")
    if state and all(k.startswith(PEFT_PREFIX) for k in state):
        state = {k[len(PEFT_PREFIX):]: v for k, v in state.items()}
    return state


def read_config_file(path: str | Path) -> Any:
    """The ``LoraConfig`` of an ``adapter_config.json``; a damaged one ends in one sentence."""
    from peft import LoraConfig

    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        return LoraConfig(**{k: v for k, v in saved.items() if k in LoraConfig.__dataclass_fields__})
    except Exception as err:  # not JSON, not UTF-8, not a mapping, values LoraConfig refuses
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise ValueError(f"adapter config {str(path)!r} could not be read ({reason}): the file is damaged; export the "
                         "adapter again.") from None


def load_adapter(network: nn.Module, directory: str | Path, name: str) -> None:
    """Inject the adapter saved in ``directory`` into ``network`` under ``name`` and load its weights."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"no LoRA adapter in {directory} (expected {CONFIG_NAME} and {WEIGHTS_NAME}).")
    config = read_config_file(directory / CONFIG_NAME)
    weights = read_weights_file(directory / WEIGHTS_NAME)
    inject_adapter_in_model(config, network, adapter_name=name)
    result = set_peft_model_state_dict(network, weights, adapter_name=name)
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


@contextmanager
def adapters_disabled(network: nn.Module) -> Iterator[None]:
    """Run a block with every LoRA adapter of ``network`` off: the base model's outputs."""
    layers = list(lora_layers(network))
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True  # peft's flag; disable_adapters() would also flip requires_grad
    try:
        yield
    finally:
        for layer, flag in zip(layers, before):
            layer._disable_adapters = flag


#: the weight files of the layouts an exported adapter may have: peft's, or diffusers'
#: ``save_lora_weights`` (``pipeline.load_lora_weights``)
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def read_adapter_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA weights saved in ``directory`` with peft's key names (no ``base_model.model.``
    prefix), from peft's layout or from diffusers' (``unet.`` / ``transformer.`` keys, UNet keys
    in diffusers' ``lora.down`` / ``lora.up`` naming)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter {str(directory)!r} is not a directory; give the lora/ folder a fit wrote "
                                "(sdo fit writes it to <log dir>/lora).")
    peft_file, diffusers_file = directory / WEIGHTS_NAME, directory / DIFFUSERS_WEIGHTS_NAME
    if peft_file.is_file():
        return read_weights_file(peft_file)
    if not diffusers_file.is_file():
        raise FileNotFoundError(f"no LoRA adapter in {directory} (expected {WEIGHTS_NAME} with {CONFIG_NAME}, or "
                                f"{DIFFUSERS_WEIGHTS_NAME}); give the lora/ folder a fit wrote.")
    state = read_weights_file(diffusers_file)
    prefixes = {key.split(".", 1)[0] for key in state}
    if len(prefixes) == 1 and prefixes & {"unet", "transformer"}:
        state = {key.split(".", 1)[1]: value for key, value in state.items()}
    if any(".lora.down." in key or ".lora.up." in key for key in state):
        from diffusers.utils import convert_unet_state_dict_to_peft

        state = convert_unet_state_dict_to_peft(state)
    return state


def load_adapter_weights(network: nn.Module, directory: str | Path, name: str = "default") -> None:
    """Load the adapter saved in ``directory`` into ``network``'s existing adapter ``name`` (same
    rank and layers), refusing one whose layers or shapes differ."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    saved = read_adapter_weights(directory)
    own = get_peft_model_state_dict(network, adapter_name=name)
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    shapes = [k for k in set(own) & set(saved) if tuple(own[k].shape) != tuple(saved[k].shape)]
    if missing or extra or shapes:
        what = (f"its {tuple(saved[shapes[0]].shape)} {shapes[0]} is {tuple(own[shapes[0]].shape)} here" if shapes else
                f"it lacks {missing[0]}" if missing else f"it has {extra[0]}, which this model has not")
        raise ValueError(f"adapter {directory} does not fit this {type(network).__name__} and its LoRA settings "
                         f"({what}); it was trained on another base model or with another lora_rank / "
                         "lora_target_modules: use the same backbone and LoRA settings as the fit that wrote it.")
    set_peft_model_state_dict(network, saved, adapter_name=name)
    network.requires_grad_(False)


def base_signature(network: nn.Module) -> str:
    """A short fingerprint of ``network``'s base (non-LoRA) weights: a hash of every name and
    shape, and of the sums of a few tensors to 3 significant digits (equal across fp32/fp16/bf16
    loads of the same file; different for other weights of the same architecture)."""
    import hashlib

    params = [(n, p) for n, p in network.named_parameters() if "lora_" not in n]
    h = hashlib.sha256()
    for n, p in params:
        h.update(f"{n}:{tuple(p.shape)};".encode())
    picks = params[:: max(1, len(params) // 8)][:8]
    with torch.no_grad():
        for _, p in picks:
            h.update(f"{float(p.detach().double().abs().sum()):.3g};".encode())
    return h.hexdigest()[:16]


def write_model_card(directory: str | Path, fields: dict[str, Any], metrics: dict[str, float] | None = None) -> Path:
    """Write ``README.md`` into an adapter directory: YAML front matter (``fields`` plus
    ``metrics``, what the Hub's model cards carry) and a short description with a loading example,
    as diffusers' LoRA training scripts write one."""
    import yaml

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    front = {"library_name": "sdo-lightning", "tags": ["lora", "sdo-lightning", "reward-fine-tuning"], **fields}
    if metrics:
        # full precision: YAML writes a float's shortest round-trip repr, so the card reads back exactly
        front["validation"] = {k: float(v) for k, v in metrics.items()}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# LoRA of {fields.get('base_model', 'a diffusion model')}", "",
             f"Fine-tuned with sdo-lightning's RewardFineTuning on the reward `{fields.get('reward')}` for "
             f"{fields.get('steps')} optimizer steps (gradient mode `{fields.get('gradient_mode')}`, solver "
             f"`{fields.get('solver')}`, rank {fields.get('lora_rank')}).", ""]
    if fields.get("selected_by"):
        lines += [f"Selected checkpoint: step {fields.get('steps')} of {fields.get('final_step')}, the best by "
                  f"`{fields['selected_by']}` = {fields.get('selected_score')}.", ""]
    if metrics:
        lines += ["## Validation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {float(v):.4g} |" for k, v in metrics.items()]
        lines.append("")
    lines += ["## Use", "", "Images for the data module's evaluation rows (`--data.eval_samples`, `--data.eval_class_label`, "
              "`--data.eval_prompts`, `--data.eval_seed`), written as predict_grid.png and predictions.npz:", "",
              "```bash", f"sdo predict --config CONFIG --model.adapter {directory}", "```", ""]
    path = directory / "README.md"
    path.write_text("\n".join(lines))
    return path


def read_model_card(directory: str | Path) -> dict[str, Any]:
    """The YAML front matter of ``directory/README.md`` ({} without one)."""
    path = Path(directory) / "README.md"
    if not path.is_file():
        return {}
    return front_matter(path.read_bytes().decode("utf-8", errors="replace"))


def front_matter(text: str) -> dict[str, Any]:
    """The YAML mapping between a first line ``---`` and the next line that is ``---`` alone ({}
    without one). A value holding ``---`` or a newline does not end it: YAML writes such a value
    on one line, or quoted over indented lines, never as a bare ``---`` line."""
    import yaml

    lines = text.split("\n")  # the writer's line ends; YAML escapes the others (\r, U+2028) in values
    if lines[0].rstrip() != "---":
        return {}
    end = next((i for i, line in enumerate(lines[1:], 1) if line.rstrip() in ("---", "...")), None)
    if end is None:
        return {}
    try:
        front = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:
        return {}
    return front if isinstance(front, dict) else {}
