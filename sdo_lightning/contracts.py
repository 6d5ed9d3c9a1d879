"""The public plugin contracts: :class:`Objective`, :class:`Solver`, :class:`GradientMode`, and the
:class:`RunContext` that optimization targets and searches read.

A plugin is a subclass of one of these (or of :class:`~sdo_lightning.backbones.Backbone` or
:class:`~sdo_lightning.searches.Search`, the other two kinds, each beside its built-ins). Defining (importing) a concrete subclass registers it under its class name; see
:mod:`sdo_lightning.registry` for the table and how third-party packages are found.
"""

from __future__ import annotations

import abc
import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import Tensor, nn

from sdo_lightning import registry

class Objective(nn.Module, abc.ABC):
    """A differentiable metric on generated images: lower is better.

    Subclasses implement ``forward(images, batch)``: ``images`` is a ``(B, C, H, W)`` float
    tensor with values in ``[0, 1]`` (decoded samples), ``batch`` is the dict the data module
    produced for these samples (class labels, prompts, reference images, ...). It returns a
    per-sample loss of shape ``(B,)``. It must not mix samples: sample ``i``'s loss may only
    depend on ``images[i]``.

    ``terms`` may be filled by ``forward`` with named per-sample tensors (e.g. the target-class
    probability) that the LightningModules log beside the loss.
    """

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            registry.register("objectives", cls)

    def __init__(self) -> None:
        super().__init__()
        self.terms: dict[str, Tensor] = {}

    @abc.abstractmethod
    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        """Return the per-sample loss ``(B,)`` of ``images`` ``(B, C, H, W)`` in ``[0, 1]``."""


@dataclass
class SolverState:
    """Everything one trajectory's solver needs, fresh for every trajectory.

    Attributes:
        scheduler: a newly built diffusers scheduler whose ``set_timesteps`` was called for this
            trajectory (multistep solvers keep their history in it).
        timesteps: the timesteps this trajectory visits, one network call each.
        generator: the trajectory's random generator, or one per sample (stochastic solvers
            draw from it only; diffusers schedulers accept both).
    """

    scheduler: Any
    timesteps: Tensor
    generator: torch.Generator | list[torch.Generator] | None = None


@functools.cache
def _options(scheduler_cls: type) -> tuple[frozenset[str], bool]:
    """The named config options a diffusers scheduler class takes, and whether it also takes
    ``**kwargs``; read once per class rather than on every trajectory."""
    params = inspect.signature(scheduler_cls.__init__).parameters
    return frozenset(params), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class Solver(abc.ABC):
    """A numerical solver of the sampling ODE/SDE, wrapping one diffusers scheduler.

    The solver owns the timesteps and the update ``x_t -> x_{t-1}`` from the network output.
    It never decides which network calls keep an autograd graph. All hidden scheduler state
    lives in the :class:`SolverState` returned by :meth:`begin`, built anew for every trajectory,
    so nothing leaks between trajectories and stochastic solvers are reproducible.

    Args:
        num_inference_steps: number of network calls of a full trajectory.
        start_timestep: start sampling at this training timestep (e.g. 600 of 1000, as in the
            paper's style and aesthetic experiments) instead of from pure noise: the trajectory
            then visits only the timesteps ``<= start_timestep`` of the full schedule.
        scheduler_kwargs: overrides of the diffusers scheduler config (e.g. ``timestep_spacing``).
    """

    #: the diffusers scheduler class this solver wraps
    scheduler_cls: ClassVar[type]
    #: config values this project sets unless the user overrides them (see the warnings)
    default_overrides: ClassVar[dict[str, Any]] = {}
    #: what the network this solver steps with predicts: ``"noise"`` for a diffusion model (epsilon,
    #: or v / x_0 as the scheduler config's ``prediction_type`` says), ``"sample"`` for a model of
    #: x_0 alone, ``"velocity"`` for a rectified flow; a backbone's ``flow_matching`` must agree
    predicts: ClassVar[Literal["noise", "sample", "velocity"]] = "noise"
    #: the step reads the current latent and network output only, no history of earlier steps
    #: (what Picard's sweeps need)
    first_order: ClassVar[bool] = False
    #: made for latent-consistency (LCM-distilled) models: poor on others, and they on other solvers
    for_lcm_models: ClassVar[bool] = False

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            registry.register("solvers", cls)

    def __init__(
        self,
        num_inference_steps: int = 50,
        start_timestep: int | None = None,
        scheduler_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        self.num_inference_steps = num_inference_steps
        self.start_timestep = start_timestep
        self.scheduler_kwargs = dict(scheduler_kwargs or {})
        self._warned = False
        self._noted_override = False

    # -- building the scheduler ----------------------------------------------------------
    def build_scheduler(self, scheduler_config: dict[str, Any] | None = None) -> Any:
        """A new diffusers scheduler from the model's config, this solver's defaults and overrides."""
        base = dict(scheduler_config or {})
        # keys of another scheduler class (a pipeline's config handed to this solver's class) are
        # not this one's options: drop them here rather than have diffusers log each one per trajectory
        accepted, any_keyword = _options(self.scheduler_cls)
        if not any_keyword:
            base = {k: v for k, v in base.items() if k in accepted}
        config = {**base, **self.default_overrides, **self.scheduler_kwargs}
        scheduler = self.scheduler_cls.from_config(config)
        self._note_overrides(base)
        self._check_skip_path(scheduler.config)
        return scheduler

    def _note_overrides(self, model_config: dict[str, Any]) -> None:
        """Say once when this solver turns off a clamp the model's own config turns on."""
        if self._noted_override:
            return
        accepted = _options(self.scheduler_cls)[0]
        keys = [key for key in ("clip_sample", "thresholding")
                if key in accepted and model_config.get(key) is True and self.default_overrides.get(key) is False
                and key not in self.scheduler_kwargs]
        if keys:
            self._noted_override = True
            on = " and ".join(f"{key}: true" for key in keys)
            keep = ", ".join(f"{key}: true" for key in keys)
            warnings.warn(
                f"{type(self).__name__}: the model's scheduler config sets {on}, which this solver turns off "
                f"(a saturated clamp gives the SDO skip path no gradient); set scheduler_kwargs: {{{keep}}} to "
                "sample as the model's config says.",
                UserWarning,
                stacklevel=4,
            )

    def _check_skip_path(self, config: Any) -> None:
        if self._warned:
            return
        accepted = _options(self.scheduler_cls)[0]
        for key in ("clip_sample", "thresholding"):
            if key in accepted and config.get(key, False):
                self._warned = True
                warnings.warn(
                    f"{type(self).__name__}: scheduler {key}=True clamps the predicted x_0, and where "
                    "the clamp saturates the SDO skip path carries no gradient (the gradient becomes "
                    f"exactly 0); set scheduler_kwargs: {{{key}: false}} unless you need it.",
                    UserWarning,
                    stacklevel=4,
                )

    # -- one trajectory --------------------------------------------------------------------
    def begin(
        self,
        scheduler_config: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> SolverState:
        """Start one trajectory: a fresh scheduler with its timesteps set, and its generator."""
        scheduler = self.build_scheduler(scheduler_config)
        self.set_timesteps(scheduler, scheduler_config or {}, device)
        timesteps = scheduler.timesteps
        begin_index = 0
        if self.start_timestep is not None:
            later = (timesteps > self.start_timestep).nonzero()
            begin_index = int(later[-1]) + 1 if len(later) else 0
            if begin_index >= len(timesteps):
                raise ValueError(
                    f"start_timestep={self.start_timestep} is below every timestep of the schedule "
                    f"({timesteps.tolist()[-3:]}...); choose a larger start_timestep."
                )
            timesteps = timesteps[begin_index:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(begin_index)
        return SolverState(scheduler=scheduler, timesteps=timesteps, generator=generator)

    def set_timesteps(self, scheduler: Any, scheduler_config: dict[str, Any], device: torch.device | str | None) -> None:
        """Set the trajectory's timesteps on the fresh ``scheduler`` as the model's pipeline would.

        ``scheduler_config`` is the backbone's; a backbone whose pipeline passes more than the step
        count (FLUX's sigmas, the ``mu`` of dynamic shifting) puts it under ``sdo_set_timesteps``
        (see :class:`~sdo_lightning.backbones.Backbone`), which solvers of such models read.
        """
        scheduler.set_timesteps(self.num_inference_steps, device=device)

    def scale_model_input(self, x: Tensor, t: Tensor, state: SolverState) -> Tensor:
        """The network input at timestep ``t`` (identity for DDIM, DPM-Solver++ and LCM)."""
        return state.scheduler.scale_model_input(x, t)

    @abc.abstractmethod
    def step(self, model_output: Tensor, t: Tensor, x: Tensor, state: SolverState) -> Tensor:
        """Return ``x`` at the next (lower-noise) timestep. Must stay differentiable in both
        ``model_output`` and ``x``."""

    # -- what kind of solver this is, for the code around it -----------------------------------
    def nondeterminism(self) -> str | None:
        """None when :meth:`step` is a deterministic function of its inputs; else what makes it
        draw fresh noise, and the setting that stops it (``"has eta=0.5; set eta: 0"``)."""
        return None

    def prepare(self, denoiser: Callable[[Tensor, Tensor, Any], Tensor], x: Tensor, cond: Any = None, *,
                generator: torch.Generator | list[torch.Generator] | None = None,
                scheduler_config: dict[str, Any] | None = None, num_calls: int | None = None,
                progress: bool = False) -> tuple[Callable[[Tensor, Tensor, Any], Tensor], "Solver"]:
        """The ``(denoiser, solver)`` the sampling loop runs one trajectory from ``x`` with: these
        two unchanged, unless this solver wraps another (Picard computes the calls that keep no graph
        first and returns a denoiser that replays them, and the solver it wraps)."""
        return denoiser, self

    def unwrap(self) -> "Solver":
        """The solver that sets the schedule and steps: this one, or the one a wrapper wraps."""
        return self

    def forget(self) -> None:
        """Drop whatever is kept between trajectories (a wrapper's warm starts); nothing here."""

    def transition_kl(self, model_output: Tensor, reference_output: Tensor, t: Tensor, x: Tensor,
                      state: SolverState) -> Tensor | None:
        """Per-sample KL divergence ``(B,)`` between this step's transition kernels
        ``p(x_next | x)`` under ``model_output`` and under ``reference_output`` (the same ``x`` and
        ``t``), differentiable in ``model_output``; None where the step is deterministic, so that no
        KL exists (the default: solvers without a Gaussian step with noise)."""
        return None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_inference_steps={self.num_inference_steps}, "
            f"start_timestep={self.start_timestep})"
        )


@dataclass(frozen=True)
class Target:
    """What the optimizer step differentiates with respect to.

    Attributes:
        kind: ``"latent"`` for a tensor that enters the trajectory once (x_T, an intermediate
            x_t, a perturbation of it); ``"parameters"`` for anything every network call reads
            (network weights, LoRA adapters, a prompt embedding).
        first_call: for a latent, the index of the first network call that reads it.
    """

    kind: Literal["latent", "parameters"] = "latent"
    first_call: int = 0

    @classmethod
    def latent(cls, first_call: int = 0) -> "Target":
        return cls("latent", first_call)

    @classmethod
    def parameters(cls) -> "Target":
        return cls("parameters", 0)


@dataclass(frozen=True)
class GradientPlan:
    """What one trajectory does for gradients; produced by :meth:`GradientMode.plan`.

    Attributes:
        keep: ``keep[i]`` is True when network call ``i`` keeps its autograd graph.
        checkpoint: recompute kept calls' activations in backward (activation checkpointing).
        detach_before: detach the latent right before this call (truncated backprop), or None.
        detach_kept_inputs: a kept call's network reads a detached copy of its input latent
            (the solver step still uses the latent itself). With several kept calls, the
            gradient then holds each call's own term of Eq. 16 and no cross terms through a
            later kept call's Jacobian.
        grad_scale: the gradient that flows back through a kept call's network output is
            multiplied by this (the forward pass is unchanged): ``N / M`` makes SDO's parameter
            estimator unbiased for Eq. 16 (see :class:`~sdo_lightning.gradient_modes.ShortcutGradient`).
    """

    keep: tuple[bool, ...]
    checkpoint: bool = False
    detach_before: int | None = None
    detach_kept_inputs: bool = False
    grad_scale: float = 1.0

    @property
    def num_kept(self) -> int:
        return sum(self.keep)


class GradientMode(abc.ABC):
    """Decides, once per optimizer step, which network calls of a trajectory keep a graph.

    The solver arithmetic always stays differentiable; a network call that keeps no graph runs
    under ``torch.no_grad()``. Subclasses implement :meth:`plan`.
    """

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            registry.register("gradient_modes", cls)

    @abc.abstractmethod
    def plan(self, num_calls: int, target: Target, generator: torch.Generator | None = None) -> GradientPlan:
        """The :class:`GradientPlan` of one trajectory with ``num_calls`` network calls.

        Random choices (which call SDO keeps for a parameter target, the depth of a random
        truncation) are drawn from ``generator`` so runs are reproducible and resumable.
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


@dataclass(frozen=True)
class RunContext:
    """What an optimization target and a search may read of the module that runs them.

    Attributes:
        backbone: the diffusion model (a :class:`~sdo_lightning.backbones.Backbone`).
        solver: the sampler.
        seed: the run's seed, from which every per-sample stream is derived (see
            :mod:`sdo_lightning.progress`).
    """

    backbone: Any
    solver: Solver
    seed: int
