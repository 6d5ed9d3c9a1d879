"""Experiments that explain the gap between gradient fidelity and outcome (part of
``benchmarks/fidelity.py``): descent along each direction, gradient norm by backprop depth,
SDO as the exact gradient of the stop-gradient chain (paper Eq. 18-20), and the Picard lambda.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdo_lightning import Target
from sdo_lightning.evaluation.diagnostics import picard_contraction, trajectory
from sdo_lightning.gradient_modes import DRTune, FullBackprop, ShortcutGradient

from _fidelity_core import Setting, cosine, latent_grad, loss_of_images, ratio, run


def _per_sample_losses(setting: Setting, x: Tensor) -> Tensor:
    from _fidelity_core import _CLASSIFIER, TARGET_CLASS

    with torch.no_grad():
        images = run(setting, x, setting.cond, None, Target.latent())
        loss_of_images(images[:1])  # loads the classifier once
        return -torch.log_softmax(_CLASSIFIER[0](images), -1)[:, TARGET_CLASS]


# -- (a) is the SDO direction a descent direction of the true objective --------------------------
def descent(setting: Setting, lengths: list[float], sign_lrs: list[float]) -> dict[str, Any]:
    """The true loss after one step from x along each direction.

    ``normalized``: per sample, ``x - r ||x|| d / ||d||`` for relative lengths ``r`` (the exact and
    the SDO step have equal length). ``sign``: ``x - lr sign(d)``, Adam's first step (its update
    is ``lr * m / sqrt(v) = lr * sign(g)`` at step 1), for the quickstart-like learning rates.
    Loss changes are means over the samples (negative = the true loss fell).
    """
    x = setting.x
    base = _per_sample_losses(setting, x).mean().item()
    grads = {"exact": latent_grad(setting, FullBackprop()), "SDO": latent_grad(setting, ShortcutGradient()),
             "DRTune(k=5)": latent_grad(setting, DRTune(k=5)),
             "random": torch.randn(x.shape, generator=torch.Generator().manual_seed(5))}
    dims = tuple(range(1, x.dim()))
    out: dict[str, Any] = {"base_loss": base, "lengths": lengths, "sign_lrs": sign_lrs, "normalized": {}, "sign": {},
                           "cos_sdo_exact": cosine(grads["SDO"], grads["exact"])}
    xnorm = torch.linalg.vector_norm(x, dim=dims, keepdim=True)
    for name, g in grads.items():
        unit = g / torch.linalg.vector_norm(g, dim=dims, keepdim=True).clamp_min(1e-30)
        out["normalized"][name] = [_per_sample_losses(setting, x - r * xnorm * unit).mean().item() - base for r in lengths]
        out["sign"][name] = [_per_sample_losses(setting, x - lr * g.sign()).mean().item() - base for lr in sign_lrs]
    # first-order prediction of the exact gradient along each unit direction (the slope at 0)
    out["slope"] = {name: -(grads["exact"] * g / torch.linalg.vector_norm(g, dim=dims, keepdim=True).clamp_min(1e-30) * xnorm).sum().item()
                    / len(x) for name, g in grads.items()}
    return out


# -- (b) the exact gradient's norm by backprop depth ----------------------------------------------
def depth_norms(setting: Setting) -> dict[str, list[float]]:
    """Per-sample-mean norm of d loss / d x_k along the sequential chain, k = 0 (x_0, the output)
    to N (the start latent), for the exact chain and for the skip path alone (every network output
    held constant: what DRTune gives a latent)."""
    out: dict[str, list[float]] = {}
    for name, mode in (("exact", FullBackprop()), ("skip path only", DRTune(k=1))):
        x = setting.x.detach().clone().requires_grad_(True)
        states = [x]

        def keep(step: Any) -> None:
            step.next.retain_grad()
            states.append(step.next)

        loss = loss_of_images(run(setting, x, setting.cond, mode, Target.latent(), callback=keep))
        loss.backward()
        dims = tuple(range(1, x.dim()))
        # states[j] is read by call j; depth = number of calls between it and x_0
        out[name] = [torch.linalg.vector_norm(s.grad, dim=dims).mean().item() for s in reversed(states)]
    return out


# -- (c) SDO is the exact gradient of the chain with stop-gradients (Eq. 18-20) --------------------
def _reference_scheduler(setting: Setting) -> Any:
    import diffusers

    config = dict(setting.backbone.scheduler_config)
    cls = getattr(diffusers, setting.solver.scheduler_cls.__name__)
    extra = {"DDIMScheduler": {"clip_sample": False}, "DPMSolverMultistepScheduler": {"algorithm_type": "dpmsolver++"}}
    return cls.from_config(config, **extra.get(cls.__name__, {}))


def stop_gradient_chain(setting: Setting, x: Tensor, frozen: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
    """Eq. 18 written out over the diffusers scheduler: x_0 where only the first network call is
    differentiable and every later output is ``sg(.)`` (or, with ``frozen``, the recorded outputs
    of another trajectory held constant: the surrogate objective SDO differentiates)."""
    scheduler = _reference_scheduler(setting)
    scheduler.set_timesteps(setting.solver.num_inference_steps)
    outputs = []
    for i, t in enumerate(scheduler.timesteps):
        if i == 0:
            eps = setting.backbone.denoise(x, t, setting.cond)
        elif frozen is not None:
            eps = frozen[i]
        else:
            with torch.no_grad():
                eps = setting.backbone.denoise(x, t, setting.cond)
        outputs.append(eps.detach())
        x = scheduler.step(eps, t, x).prev_sample
    return setting.backbone.decode(x), outputs


def eq18_check(setting: Setting, h: float = 1e-6) -> dict[str, float]:
    """SDO (``sample`` with ShortcutGradient) against the hand-written stop-gradient chain, and a
    central finite difference of the surrogate objective (later calls' outputs frozen) along a
    random direction against SDO's directional derivative; float64.

    The digits backbones decode with a straight-through clamp (forward clamps to [0, 1], backward
    passes the gradient as if it did not), whose gradient is no derivative of its forward pass; the
    finite-difference part therefore decodes with the unclamped map ``(x + 1) / 2`` on both sides.
    ``h`` is small because the skip path amplifies a change of x_T up to ~1/sqrt(abar_T) times.
    """
    from _fidelity_core import _CLASSIFIER

    loss_of_images(setting.backbone.decode(setting.x[:1]))  # loads the classifier
    _CLASSIFIER[0].double()
    backbone = setting.backbone.double()
    try:
        x = setting.x.double().detach().requires_grad_(True)
        s64 = Setting(backbone, setting.solver, x, setting.cond, setting.seed)
        sdo = latent_grad(s64, ShortcutGradient(), x)
        exact = latent_grad(s64, FullBackprop(), x)
        images, frozen = stop_gradient_chain(s64, x)
        (ref,) = torch.autograd.grad(loss_of_images(images), x)
        out = {"rel_diff_sdo_vs_chain": ratio(sdo - ref, ref), "cos_sdo_vs_chain": cosine(sdo, ref),
               "cos_sdo_exact": cosine(sdo, exact)}
        backbone.decode = lambda z: (z + 1) / 2  # the unclamped decoder, for the finite difference
        sdo = latent_grad(s64, ShortcutGradient(), x)
        exact = latent_grad(s64, FullBackprop(), x)
        direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        with torch.no_grad():
            plus = loss_of_images(stop_gradient_chain(s64, x + h * direction, frozen)[0])
            minus = loss_of_images(stop_gradient_chain(s64, x - h * direction, frozen)[0])
        out.update(fd_surrogate=((plus - minus) / (2 * h)).item(), sdo_directional=(sdo * direction).sum().item(),
                   exact_directional=(exact * direction).sum().item())
        return out
    finally:
        backbone.__dict__.pop("decode", None)
        setting.backbone.float()
        _CLASSIFIER[0].float()


# -- (d) the Picard lambda --------------------------------------------------------------------------
def picard_lambda(setting: Setting, perturbation: float = 0.1) -> float:
    """lambda of Theorem 4.1 as ``sdo_lightning.evaluation.diagnostics.picard_contraction`` estimates it, from
    the trajectory of a perturbed start latent as the guess (its start replaced by the true one).
    DDIM with eta 0 only (nan otherwise)."""
    b = setting.backbone
    noise = torch.randn(setting.x.shape, generator=torch.Generator().manual_seed(11))
    guess = trajectory(b.denoise, setting.solver, setting.x + perturbation * noise, setting.cond, b.scheduler_config)
    guess[0] = setting.x
    lam, _ = picard_contraction(b.denoise, setting.solver, setting.x, setting.cond, guess, b.scheduler_config)
    return lam
