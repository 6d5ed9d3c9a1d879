"""What :class:`~sdo_lightning.LatentOptimization` optimizes, one small type each.

A target prepares each sample's starting latent, makes the optimized variable, says how the
trajectory reads it (which gives the gradient mode its :class:`~sdo_lightning.Target`), and
projects it back onto its constraint set after every optimizer step, holding what that needs
(the start latents' norms). It reads the model, solver and seed from the
:class:`~sdo_lightning.contracts.RunContext` the module hands it, never the module.

In YAML ``target: x_T``, ``target: x_t`` and ``target: embedding`` are the short forms of
``StartNoise()``, ``IntermediateLatent()`` and ``ConditionEmbedding()``; options go under
``init_args``, e.g. ``{class_path: StartNoise, init_args: {linf_radius: 0.1}}``.
"""

from __future__ import annotations

import abc
import copy
from typing import Any

import torch
from torch import Tensor

from sdo_lightning import progress, registry
from sdo_lightning.contracts import RunContext, Solver, Target
from sdo_lightning.sampling import sample
from sdo_lightning.sampling.inversion import invert
from sdo_lightning.white_noise import project_to_white_noise


class OptimizationTarget(abc.ABC):
    """What is optimized, and how it enters the sampling chain."""

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            registry.register("targets", cls)

    def check(self, solver: Solver) -> None:
        """Raise ValueError when the target does not fit the solver's schedule."""

    #: the optimized variable is itself each sample's starting noise x_T, so fresh Gaussian draws
    #: are values it may take (what best-of-N needs)
    variable_is_noise: bool = False

    def start_latent(self, noise: Tensor, cond: Any, batch: dict[str, Any], context: RunContext) -> Tensor:
        """The latent the optimized trajectory starts from, for the rows of ``noise`` (this
        process's samples; ``cond`` and ``batch`` hold the same rows)."""
        return noise

    @abc.abstractmethod
    def initial_variable(self, start: Tensor, cond: Any, context: RunContext) -> Tensor:
        """The optimized tensor before the first step (one row per sample), from every sample's
        prepared start latent ``start``; a target that projects keeps what it projects with here."""

    @abc.abstractmethod
    def trajectory_inputs(self, variable: Tensor, start: Tensor, cond: Any, context: RunContext) -> tuple[Tensor, Any]:
        """``(start latent, conditioning)`` of the trajectory, from rows of the variable, the
        prepared start latent and the conditioning."""

    def gradient_target(self) -> Target:
        """What the gradient mode differentiates with respect to: a latent read by the first call."""
        return Target.latent()

    def project(self, variable: Tensor, rows: Tensor | None = None) -> None:
        """Put ``variable`` (every sample's, or the rows of samples ``rows``) back onto the
        constraint set, in place: after an optimizer step, and a search's candidates."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class _Latent(OptimizationTarget):
    """A latent read once, at the start of the optimized trajectory: the variable itself, or a
    bounded perturbation added to it."""

    def __init__(self, project_to_shell: bool = True, linf_radius: float | None = None) -> None:
        if linf_radius is not None and not linf_radius > 0:
            raise ValueError(f"linf_radius must be > 0 (the L-infinity bound of the perturbation), got {linf_radius}.")
        self.project_to_shell = project_to_shell
        self.linf_radius = linf_radius
        self._shell_norm: Tensor | None = None  # each start latent's norm, set by initial_variable

    def initial_variable(self, start: Tensor, cond: Any, context: RunContext) -> Tensor:
        self._shell_norm = start.flatten(1).norm(dim=1)
        return torch.zeros_like(start) if self.linf_radius is not None else start.clone()

    def trajectory_inputs(self, variable: Tensor, start: Tensor, cond: Any, context: RunContext) -> tuple[Tensor, Any]:
        return (start + variable if self.linf_radius is not None else variable), cond

    def project(self, variable: Tensor, rows: Tensor | None = None) -> None:
        if self.linf_radius is not None:
            variable.clamp_(-self.linf_radius, self.linf_radius)
        elif self.project_to_shell:
            if self._shell_norm is None:
                raise RuntimeError(f"{type(self).__name__}.project needs initial_variable first (the norms it projects to).")
            # in the variable's dtype, as a module buffer cast by the Trainer's precision was
            shell_norm = self._shell_norm if rows is None else self._shell_norm[rows.to(self._shell_norm.device)]
            shell_norm = shell_norm.to(variable.device, variable.dtype)
            norms = variable.flatten(1).norm(dim=1).clamp_min(1e-12)
            variable.mul_((shell_norm / norms).view(-1, *[1] * (variable.dim() - 1)))


class StartNoise(_Latent):
    """The starting noise x_T of each sample.

    Args:
        project_to_shell: after every step, rescale each latent to its initial norm (the shell
            where Gaussian noise lives). Keeps x_T a plausible noise sample, which stops the
            optimization from drifting into images that only fool the objective.
        linf_radius: if set, optimize a perturbation of x_T bounded by this radius in the
            L-infinity norm (clamped after every step) instead of x_T itself.
        white_noise: after every step, also give each latent the statistics of white noise: per
            channel mean 0, variance 1 and equal power in every spatial-frequency ring
            (:func:`~sdo_lightning.white_noise.project_to_white_noise`), then its norm shell if
            ``project_to_shell``. Stops the noise from gathering power in the few frequencies an
            objective likes, which the model never saw in training.
    """

    def __init__(self, project_to_shell: bool = True, linf_radius: float | None = None, white_noise: bool = False) -> None:
        super().__init__(project_to_shell, linf_radius)
        if white_noise and linf_radius is not None:
            raise ValueError("StartNoise: white_noise projects x_T itself, linf_radius optimizes a perturbation of it; "
                             "set one of them.")
        self.white_noise = white_noise

    def project(self, variable: Tensor, rows: Tensor | None = None) -> None:
        if self.white_noise:
            variable.copy_(project_to_white_noise(variable))
        super().project(variable, rows)

    @property
    def variable_is_noise(self) -> bool:  # type: ignore[override]
        return self.linf_radius is None  # else the variable is a bounded perturbation of x_T

    def check(self, solver: Solver) -> None:
        if solver.start_timestep is not None:
            raise ValueError(
                f"target 'x_T' starts from pure noise but the solver starts at t={solver.start_timestep}; "
                "use target: x_t for an intermediate latent, or drop the solver's start_timestep."
            )


class IntermediateLatent(_Latent):
    """An intermediate latent x_t at the solver's ``start_timestep``, reached by sampling from
    x_T without gradient, or by DDIM inversion of real images.

    Args:
        invert_images: reach x_t by DDIM inversion of the data module's real images
            (``batch["image"]``) instead of by sampling from noise.
        project_to_shell: after every step, rescale each latent to its initial norm.
        linf_radius: if set, optimize a perturbation of x_t bounded by this radius in the
            L-infinity norm instead of x_t itself.
    """

    def __init__(self, invert_images: bool = False, project_to_shell: bool = True, linf_radius: float | None = None) -> None:
        super().__init__(project_to_shell, linf_radius)
        self.invert_images = invert_images

    def check(self, solver: Solver) -> None:
        if solver.start_timestep is None:
            raise ValueError("target 'x_t' needs the solver's start_timestep (e.g. 600) to say which latent.")

    def start_latent(self, noise: Tensor, cond: Any, batch: dict[str, Any], context: RunContext) -> Tensor:
        backbone, solver = context.backbone, context.solver
        if self.invert_images:
            return _invert(batch, cond, context, noise.device)
        # Sample from x_T down to x_t without gradient; a stochastic solver draws the prefix's
        # noise from a stream of its own, so the optimized chain below x_t does not replay it.
        prefix_solver = copy.copy(solver)
        prefix_solver.start_timestep = None
        timesteps = prefix_solver.begin(backbone.scheduler_config).timesteps
        calls = int((timesteps > solver.start_timestep).sum())
        seeds = [progress.latent_prefix_seed(context.seed, int(i)) for i in batch["index"].tolist()]
        return sample(backbone.denoise, prefix_solver, noise, cond, num_calls=calls,
                      generator=progress.generators(seeds, noise.device), scheduler_config=backbone.scheduler_config)


def _invert(batch: dict[str, Any], cond: Any, context: RunContext, device: torch.device) -> Tensor:
    backbone = context.backbone
    if "image" not in batch:
        raise KeyError("invert_images needs real images in the batch: give the data module images "
                       "(e.g. SampleSet(images='digits')).")
    clean = backbone.encode(batch["image"].to(device))
    if tuple(clean.shape[1:]) != tuple(backbone.latent_shape):
        size = tuple(batch["image"].shape[1:])
        raise ValueError(
            f"invert_images: images of shape {size} encode to latents {tuple(clean.shape[1:])}, but "
            f"{type(backbone).__name__} samples latents {tuple(backbone.latent_shape)}; resize the "
            "images to the model's image size (and channels) first."
        )
    return invert(backbone.denoise, clean, cond, context.solver, backbone.scheduler_config)


class ConditionEmbedding(OptimizationTarget):
    """Each sample's conditioning embedding (a prompt embedding, a class embedding), read by
    every network call; the starting noise stays fixed."""

    def initial_variable(self, start: Tensor, cond: Any, context: RunContext) -> Tensor:
        emb = context.backbone.condition_embedding(cond)
        if emb is None:
            raise ValueError(f"{type(context.backbone).__name__} has no conditioning embedding to optimize.")
        return emb

    def trajectory_inputs(self, variable: Tensor, start: Tensor, cond: Any, context: RunContext) -> tuple[Tensor, Any]:
        return start, context.backbone.with_embedding(cond, variable)

    def gradient_target(self) -> Target:
        # read by every network call, like parameters
        return Target.parameters()


#: the YAML short forms
SHORT_FORMS: dict[str, type[OptimizationTarget]] = {"x_T": StartNoise, "x_t": IntermediateLatent,
                                                    "embedding": ConditionEmbedding}


def as_target(target: OptimizationTarget | str) -> OptimizationTarget:
    """``target`` itself, or the default target of a short form (``x_T``, ``x_t``, ``embedding``)."""
    if isinstance(target, OptimizationTarget):
        return target
    if target not in SHORT_FORMS:
        raise ValueError(f"target {target!r} is not known; use one of {', '.join(SHORT_FORMS)} or a target class "
                         f"({', '.join(registry.names('targets'))}).")
    return SHORT_FORMS[target]()
