"""Gradients of every mode on one setting, from two passes (part of ``benchmarks/fidelity.py``).

For a parameter target (LoRA adapters, the class embedding) every network call ``i`` reads its
own copy ``theta + delta_i`` of the parameters (``delta_i = 0``, a leaf), so one backward pass
returns each call's own contribution ``d J / d delta_i``:

* the exact pass (every call keeps its graph, nothing detached) gives the terms of Eq. 11b:
  their sum is the exact gradient, the sum of the last K is truncated backprop with K calls,
  and their mean over K = 1..N of suffix sums is the expectation of AlignProp-uniform;
* the stop-gradient pass (every call keeps its graph and reads a detached input) gives the
  terms of Eq. 16: term i is SDO's gradient when call i is drawn, the sum over a drawn set of
  M calls is SDO with ``num_kept = M``, the sum over DRTune's kept set is DRTune's gradient.

So every draw of every random mode is enumerable from two passes. ``tests/test_fidelity.py``
checks these reconstructions against the modes themselves run through ``sdo_lightning.sample``.
Latent targets (x_T, x_t) use the modes directly: one pass each.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sdo_lightning import GradientMode, GradientPlan, Target, sample
from sdo_lightning.gradient_modes import DRTune, FullBackprop, ShortcutGradient

TARGET_CLASS = 7


class _AllCalls(GradientMode, register=False):
    """Every call keeps its graph; ``detach_inputs``: every call's network reads a detached input."""

    def __init__(self, detach_inputs: bool) -> None:
        self.detach_inputs = detach_inputs

    def plan(self, num_calls: int, target: Target, generator: torch.Generator | None = None) -> GradientPlan:
        return GradientPlan(keep=(True,) * num_calls, detach_kept_inputs=self.detach_inputs)


# -- models -------------------------------------------------------------------------------------
def load_backbone(kind: str, trained: bool, seed: int = 1) -> Any:
    """The embedded digits model (``kind`` ``ddpm`` or ``flow``), or the same architecture with
    diffusers' default random initialization (``trained=False``, seeded)."""
    from diffusers import UNet2DModel

    from sdo_lightning.backbones import DigitsBackbone, FlowDigitsBackbone

    backbone = (DigitsBackbone if kind == "ddpm" else FlowDigitsBackbone)()
    if not trained:
        torch.manual_seed(seed)
        fresh = UNet2DModel.from_config(backbone.unet.config)
        backbone.unet.load_state_dict(fresh.state_dict())
    backbone.unet.eval()
    return backbone


_CLASSIFIER: list[nn.Module] = []


def _loss(images: Tensor) -> Tensor:
    if not _CLASSIFIER:
        from sdo_lightning.digits import WEIGHTS_DIR, DigitClassifier

        _CLASSIFIER.append(DigitClassifier.from_pretrained(WEIGHTS_DIR / "classifier").eval().requires_grad_(False))
    return -torch.log_softmax(_CLASSIFIER[0](images), -1)[:, TARGET_CLASS].sum()


def loss_of_images(images: Tensor) -> Tensor:
    """Summed -log p(7) of the shipped digits classifier (no augmentation: deterministic)."""
    return _loss(images)


# -- one setting --------------------------------------------------------------------------------
@dataclass
class Setting:
    backbone: Any
    solver: Any
    x: Tensor          # the start latent of the (sub)trajectory
    cond: Any          # class labels (long) or embeddings (float)
    seed: int = 0      # generator of stochastic solvers (LCM)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + 1)


def make_setting(backbone: Any, solver: Any, batch: int = 8, seed: int = 0, start_call: int = 0) -> Setting:
    """``batch`` unconditional samples from noise ``seed``; with ``start_call`` > 0 the setting
    starts at x_t, the latent the full trajectory reaches after ``start_call`` calls (without
    gradient), and runs the rest of the schedule from there."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *backbone.latent_shape, generator=gen)
    cond = torch.full((batch,), backbone.NULL_CLASS, dtype=torch.long)
    setting = Setting(backbone, solver, x, cond, seed)
    if start_call == 0:
        return setting
    with torch.no_grad():
        timesteps = solver.begin(backbone.scheduler_config).timesteps
        xt = sample(backbone.denoise, solver, x, cond, scheduler_config=backbone.scheduler_config,
                    generator=setting.generator(), num_calls=start_call)
    suffix = copy.copy(solver)
    t = timesteps[start_call]
    suffix.start_timestep = float(t) if t.is_floating_point() else int(t)
    return Setting(backbone, suffix, xt, cond, seed)


def run(setting: Setting, x: Tensor, cond: Any, mode: GradientMode | None, target: Target,
        denoiser: Any = None, callback: Any = None) -> Tensor:
    """x_0 decoded of the setting's trajectory from ``x`` with ``cond``."""
    b = setting.backbone
    x0 = sample(denoiser or b.denoise, setting.solver, x, cond, gradient_mode=mode, target=target,
                generator=setting.generator(), scheduler_config=b.scheduler_config, callback=callback,
                plan_generator=torch.Generator().manual_seed(0))
    return b.decode(x0)


def latent_grad(setting: Setting, mode: GradientMode, x: Tensor | None = None) -> Tensor:
    """The gradient of the summed loss with respect to the start latent, under ``mode``."""
    x = (setting.x if x is None else x).detach().clone().requires_grad_(True)
    loss = loss_of_images(run(setting, x, setting.cond, mode, Target.latent()))
    return torch.autograd.grad(loss, x)[0]


def latent_grads(setting: Setting) -> dict[str, Tensor]:
    return {"exact": latent_grad(setting, FullBackprop()), "SDO": latent_grad(setting, ShortcutGradient()),
            "DRTune(k=5)": latent_grad(setting, DRTune(k=5))}


class _Denoise(nn.Module):
    """The backbone's denoiser as a module, so ``torch.func.functional_call`` can swap its weights."""

    def __init__(self, backbone: Any) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self.backbone.denoise(x, t, cond)


class _PerCallParameters:
    """Runs the denoiser with call ``i``'s own copy ``theta + delta_i`` of the named parameters."""

    def __init__(self, backbone: Any, names: list[str], deltas: list[list[Tensor]]) -> None:
        self.module = _Denoise(backbone)
        self.params = dict(backbone.unet.named_parameters())
        self.names = names
        self.deltas = deltas
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        i = self.calls
        self.calls += 1
        own = {f"backbone.unet.{n}": self.params[n] + d for n, d in zip(self.names, self.deltas[i])}
        return torch.func.functional_call(self.module, own, (x, t, cond), strict=False)


def per_call_terms(setting: Setting, wrt: str, detach_inputs: bool, lora_names: list[str] | None = None) -> Tensor:
    """``(N, P)``: call i's own contribution to the gradient of the summed loss with respect to
    the LoRA adapters (``wrt='lora'``, the parameters named ``lora_names``) or the class
    embedding (``wrt='embedding'``), in the exact pass (``detach_inputs=False``) or the
    stop-gradient pass (``True``)."""
    b = setting.backbone
    n = len(setting.solver.begin(b.scheduler_config).timesteps)
    mode = _AllCalls(detach_inputs)
    if wrt == "embedding":
        emb = b.condition_embedding(setting.cond)
        deltas = [torch.zeros_like(emb, requires_grad=True) for _ in range(n)]
        calls = iter(range(n))

        def denoiser(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
            i = next(calls)
            return b.denoise(x, t, cond + deltas[i])

        loss = loss_of_images(run(setting, setting.x, emb, mode, Target.parameters(), denoiser=denoiser))
        grads = torch.autograd.grad(loss, deltas)
        return torch.stack([g.flatten() for g in grads])
    params = dict(b.unet.named_parameters())
    names = list(lora_names)
    deltas = [[torch.zeros_like(params[nm], requires_grad=True) for nm in names] for _ in range(n)]
    wrapper = _PerCallParameters(b, names, deltas)
    loss = loss_of_images(run(setting, setting.x, setting.cond, mode, Target.parameters(), denoiser=wrapper))
    flat = [d for row in deltas for d in row]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    rows = []
    for i in range(n):
        chunk = grads[i * len(names):(i + 1) * len(names)]
        rows.append(torch.cat([(torch.zeros_like(d) if g is None else g).flatten()
                               for g, d in zip(chunk, deltas[i])]))
    return torch.stack(rows)


# -- the modes from the terms ---------------------------------------------------------------------
def cosine(a: Tensor, b: Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0, eps=1e-300).item()


def ratio(a: Tensor, b: Tensor) -> float:
    return (a.double().norm() / b.double().norm().clamp_min(1e-300)).item()


def parameter_modes(exact_terms: Tensor, sg_terms: Tensor, draws: int = 16, seed: int = 0) -> dict[str, dict[str, float]]:
    """Cosine and norm ratio to the exact gradient of every mode, from the two passes' terms.

    For a mode that draws: ``cos_expect`` / ``ratio_expect`` of its expectation over the draws,
    ``cos_draw`` / ``ratio_draw`` the mean over draws of a single draw's cosine / norm ratio
    (all draws enumerated where that is cheap: SDO's N calls, AlignProp-uniform's N depths,
    DRTune's offsets; for SDO with M kept calls the single-draw numbers are the mean over
    ``draws`` random subsets and the expectation is the exact one, M / N times Eq. 16).
    Norm ratios are of the mode's default scale (SDO ``paper``: the single call's gradient as it is).
    """
    n = exact_terms.shape[0]
    exact = exact_terms.sum(0)
    out: dict[str, dict[str, float]] = {}

    def deterministic(name: str, g: Tensor) -> None:
        out[name] = {"cos_expect": cosine(g, exact), "ratio_expect": ratio(g, exact),
                     "cos_draw": cosine(g, exact), "ratio_draw": ratio(g, exact)}

    def drawn(name: str, grads: list[Tensor], scale: float = 1.0) -> None:
        mean = torch.stack(grads).mean(0) * scale
        out[name] = {"cos_expect": cosine(mean, exact), "ratio_expect": ratio(mean, exact),
                     "cos_draw": sum(cosine(g, exact) for g in grads) / len(grads),
                     "ratio_draw": sum(ratio(g * scale, exact) for g in grads) / len(grads)}

    deterministic("exact", exact)
    drawn("SDO", list(sg_terms))
    drawn("SDO unbiased", list(sg_terms), scale=float(n))
    gen = torch.Generator().manual_seed(seed)
    for m in (2, 4):
        if m >= n:
            continue
        subsets = [torch.randperm(n, generator=gen)[:m] for _ in range(draws)]
        drawn(f"SDO num_kept={m}", [sg_terms[s].sum(0) for s in subsets])
        # its exact expectation is M / N times Eq. 16 (every call kept with probability M / N)
        expectation = sg_terms.sum(0) * m / n
        out[f"SDO num_kept={m}"].update(cos_expect=cosine(expectation, exact), ratio_expect=ratio(expectation, exact))
    suffix = exact_terms.flip(0).cumsum(0).flip(0)  # suffix[i] = sum of terms i..N-1
    for k in (1, 2, 5):
        if k < n:
            deterministic(f"Truncated K={k}", suffix[n - k])
    drawn("AlignProp-uniform", [suffix[n - k] for k in range(1, n + 1)])
    dr = DRTune(k=5)
    stride = n // min(dr.k, n)
    drawn("DRTune(k=5)", [sg_terms[dr.kept_calls(n, s)].sum(0) for s in range(stride)])
    return out


def lora_names(backbone: Any, rank: int = 4) -> list[str]:
    """Inject the digits LoRA (rank 4, as configs/digits/finetune_lora.yaml) once; its parameter names."""
    from sdo_lightning import lora

    if not getattr(backbone, "_fidelity_lora", False):
        lora.add_lora(backbone.unet, rank, rank, backbone.lora_target_modules)
        backbone._fidelity_lora = True  # at its start (B = 0), as fine-tuning begins: gradient on B only
    return [n for n, p in backbone.unet.named_parameters() if "lora_" in n]


__all__ = ["Setting", "cosine", "latent_grads", "load_backbone", "make_setting", "parameter_modes",
           "per_call_terms", "ratio", "run"]
