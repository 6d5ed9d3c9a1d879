"""RewardFineTuning's anchoring to the base model: which calls may keep a graph (a window of the
chain), the KL to the base model's transition kernel at those, and the metrics a fit logs (what a
``ModelCheckpoint`` or ``EarlyStopping`` may monitor). A mixin of
:class:`~sdo_lightning.modules.reward_finetuning.RewardFineTuning`: it reads the module's solver,
backbone, gradient mode and settings."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor

from sdo_lightning import lora
from sdo_lightning.contracts import GradientMode, GradientPlan, Target
from sdo_lightning.evaluation.metrics import Evaluation
from sdo_lightning.sampling import Step

#: the ``train/`` metrics the module logs itself (the objective's terms come on top)
OWN_TRAIN_METRICS = frozenset({"train/loss", "train/reward", "train/diversity", "train/grad_norm", "train/skipped_steps",
                               "train/adapter_l2", "train/anchor_kl", "train/held_out"})


class Anchoring:
    """The anchoring half of :class:`~sdo_lightning.modules.reward_finetuning.RewardFineTuning`."""

    # -- anchoring: which calls may keep a graph, and the KL to the base model at those ----------
    def _kept_window(self) -> tuple[int, int, int] | None:
        """``(first, stop, N)``: the calls ``first .. stop - 1`` of the ``N`` the solver makes lie in
        ``kept_timesteps`` / ``kept_fraction``; None without a window. Refuses an empty window."""
        if self.kept_timesteps is not None and self.kept_fraction is not None:
            raise ValueError("kept_timesteps and kept_fraction both set a window of kept calls; give one of them.")
        if self.kept_timesteps is None and self.kept_fraction is None:
            return None
        timesteps = [float(t) for t in self.solver.unwrap().begin(self.backbone.scheduler_config, "cpu").timesteps]
        n = len(timesteps)
        if self.kept_timesteps is not None:
            if len(self.kept_timesteps) != 2:
                raise ValueError(f"kept_timesteps must be two numbers [t_min, t_max], got {list(self.kept_timesteps)}.")
            low, high = (float(v) for v in self.kept_timesteps)
            inside = [i for i, t in enumerate(timesteps) if low <= t <= high]
            if not inside:
                span = f"{min(timesteps):g}..{max(timesteps):g}"
                what = ("is empty (t_min > t_max)" if low > high else f"lies outside the schedule (timesteps {span})"
                        if high < min(timesteps) or low > max(timesteps) else
                        f"holds none of the {n} timesteps the solver samples ({', '.join(f'{t:g}' for t in timesteps)})")
                raise ValueError(f"kept_timesteps [{low:g}, {high:g}] {what}; give a window [t_min, t_max] that "
                                 f"contains at least one of them.")
        else:
            if len(self.kept_fraction) != 2:
                raise ValueError(f"kept_fraction must be two numbers [start, end], got {list(self.kept_fraction)}.")
            start, end = (float(v) for v in self.kept_fraction)
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(f"kept_fraction [{start:g}, {end:g}] is not a window of the chain; give 0 <= start < "
                                 "end <= 1 (e.g. [0.25, 0.75] for the middle half).")
            inside = [i for i in range(n) if start <= i / n < end]
            if not inside:
                raise ValueError(f"kept_fraction [{start:g}, {end:g}] holds none of the chain's {n} calls (call i "
                                 f"sits at i / {n}); widen it to at least 1 / {n}.")
        if inside != list(range(inside[0], inside[-1] + 1)):  # a schedule whose timesteps are not monotone
            raise ValueError(f"the calls in the window are not consecutive ({inside}); give kept_fraction instead.")
        return inside[0], inside[-1] + 1, n

    def planner(self) -> GradientMode:
        """The gradient mode the training trajectories use: ``gradient_mode``, restricted to the
        window of kept calls when there is one."""
        if self.kept_window is None:
            return self.gradient_mode
        return KeptWindow(self.gradient_mode, *self.kept_window)

    def _anchoring(self, denoiser: Any) -> tuple[Any, Callable[[Step], None], list[Tensor]]:
        """``(denoiser, callback, terms)`` for a trajectory whose kept calls are compared with the
        base model: the denoiser notes the input of each call that keeps its graph, the callback
        (right after that call's solver step) runs the base model on it (no grad, adapters off)
        and appends the call's per-sample KL to ``terms``."""
        solver = self.solver.unwrap()  # a wrapper's (Picard's) loop steps with the solver it wraps
        noted: list[tuple[Tensor, Tensor, Any]] = []
        terms: list[Tensor] = []

        def noting(x: Tensor, t: Tensor, cond: Any) -> Tensor:
            if torch.is_grad_enabled():  # a kept call (or its recomputation in backward: overwritten, unused)
                noted[:] = [(x.detach(), t, cond)]
            return denoiser(x, t, cond)

        def compare(step: Step) -> None:
            if not noted or not step.model_output.requires_grad:
                return None
            x, t, cond = noted.pop()
            if self._folding is not None:
                self._folding.fold(False)  # the base weights themselves, not the adapters folded into them
            with torch.no_grad(), lora.adapters_disabled(self.backbone.network):
                base = self.backbone.denoise(x, t, cond)
            kl = solver.transition_kl(step.model_output, base, step.timestep, step.x, step.state)
            if kl is None:  # a deterministic step: the KL of unit-variance Gaussians around the outputs
                kl = 0.5 * (step.model_output.float() - base.float()).pow(2).flatten(1).sum(1)
            terms.append(kl)
            return None

        return noting, compare, terms

    def logged_metrics(self) -> tuple[set[str], bool]:
        """The names this fit can log (``train/...`` and, when it validates, ``val/...``) and
        whether it validates; the objective's own terms (``train/<term>``) are not among them."""
        names = set(OWN_TRAIN_METRICS) - {"train/adapter_l2", "train/anchor_kl", "train/held_out"}
        names |= {"train/adapter_l2"} if self.adapter_l2 else set()
        names |= {"train/anchor_kl"} if self.kl_weight else set()
        names |= {"train/held_out"} if self.held_out_objective is not None else set()
        datamodule = getattr(self.trainer, "datamodule", None)
        validates = self.trainer.limit_val_batches != 0 and getattr(datamodule, "eval_rows", True) is not None
        if validates:
            val = {"reward", "diversity", "base_diversity", "psnr", "ssim", "pixel_fid"}
            val |= {"held_out"} if self.held_out_objective is not None else set()
            evaluation = self.evaluation
            if isinstance(evaluation, Evaluation):
                val |= {"fid", "kid", "class_entropy"} if _setting(evaluation, "features") is not None else set()
                val |= {"lpips"} if _setting(evaluation, "lpips") is not None else set()
                val |= {"clip_score"} if _setting(evaluation, "clip_model") is not None else set()
            names |= {f"val/{name}" for name in val}
        return names, validates

    def _check_monitors(self) -> None:
        """Refuse, before any sampling, a ModelCheckpoint or EarlyStopping whose monitor names a
        metric this fit never logs (Lightning would say so only at the first validation)."""
        from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

        names, validates = self.logged_metrics()
        for callback in self.trainer.callbacks:
            monitor = getattr(callback, "monitor", None) if isinstance(callback, (ModelCheckpoint, EarlyStopping)) else None
            objective_term = monitor is not None and monitor.startswith("train/") and monitor not in OWN_TRAIN_METRICS
            if not monitor or monitor in names or objective_term:
                continue
            kind = type(callback).__name__
            if monitor.startswith("val/") and not validates:
                raise ValueError(f"{kind} monitors {monitor!r}, which only validation logs, and this fit does not "
                                 "validate; set data.eval_samples (and trainer.val_check_interval) or monitor a train/ "
                                 "metric.")
            raise ValueError(f"{kind} monitors {monitor!r}, which this fit never logs; monitor one of "
                             f"{', '.join(sorted(names))}.")


class KeptWindow(GradientMode, register=False):
    """A gradient mode restricted to a window of consecutive calls: ``mode`` plans a trajectory
    of the window's ``stop - first`` calls, and its plan is placed at calls ``first .. stop - 1``
    of the ``num_calls``; no call outside the window keeps its graph.

    It lives here rather than in each mode's ``plan`` because the window is the same rule for
    every mode, and only the solver's timesteps (which ``plan`` never sees) say where it lies.
    """

    def __init__(self, mode: GradientMode, first: int, stop: int, num_calls: int) -> None:
        if not 0 <= first < stop <= num_calls:
            raise ValueError(f"a window of kept calls must satisfy 0 <= first < stop <= {num_calls}, got {first}, {stop}.")
        self.mode, self.first, self.stop, self.num_calls = mode, first, stop, num_calls

    def plan(self, num_calls: int, target: Target, generator: torch.Generator | None = None) -> GradientPlan:
        if num_calls != self.num_calls:
            raise ValueError(f"the window of kept calls was set for trajectories of {self.num_calls} calls, and this one "
                             f"has {num_calls}; build the module again for the new solver.")
        inner = self.mode.plan(self.stop - self.first, target, generator)
        keep = (False,) * self.first + tuple(inner.keep) + (False,) * (num_calls - self.stop)
        detach = None if inner.detach_before is None else self.first + inner.detach_before
        return dataclasses.replace(inner, keep=keep, detach_before=detach)


def _setting(obj: Any, name: str) -> Any:
    """Constructor argument ``name`` of ``obj``, also of a jsonargparse ``lazy_instance`` not built yet
    (its attributes appear only at the first method call)."""
    if name in vars(obj):
        return vars(obj)[name]
    lazy = getattr(obj, "_lazy_kwargs", {})
    if name in lazy:
        return lazy[name]
    import inspect

    return inspect.signature(getattr(obj, "_lazy_class_type", type(obj)).__init__).parameters[name].default
