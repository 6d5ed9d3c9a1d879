"""Picard sampling (ParaDiGMS, Shih et al. 2023): the calls that keep no graph, in parallel sweeps.

A first-order solver step is affine in the latent and the network output,
``x_{i+1} = A_i x_i + B_i u_theta(x_i, t_i)``, so a whole trajectory is the fixed point of

    x_{i+1}^{k+1} = A_i x_i^{k+1} + B_i u_theta(x_i^k, t_i)                          (one sweep)

whose network calls (one per step of a window) are independent: one batched call per sweep. A
sweep evaluates the network at the guess ``x^k`` over a window of steps ``[begin, end)`` and runs
the cheap solver arithmetic down the trajectory from ``x_begin`` (which is final). As in
ParaDiGMS the window then slides to the first latent whose residual is above the tolerance (that
latent itself is final: it was computed from final inputs), so a sweep advances by at least one
step and a trajectory takes at most N sweeps.

Notation (ParaDiGMS -> here): ``x_t^k`` ``guess[i]``, the batch window ``p`` ``window``, the
tolerance ``epsilon`` ``tolerance``, the noise magnitude ``sigma_t^2`` ``variance[i]``. Latent
``i`` is final when ``||x_i^{k+1} - x_i^k||^2 / D <= tolerance^2 * variance[i]`` for every sample
of the batch, with ``variance[i]`` the variance DDPM would add at the step that reads latent ``i``
(the diffusers ParaDiGMS pipeline's ``scheduler._get_variance``; for a rectified flow the same
posterior variance of its path ``x = (1 - sigma) x_0 + sigma * noise``). That variance is 0 for
the last latents, which ParaDiGMS therefore computes exactly (one more sweep of one step at the
end); ``exact_final=False`` holds them to the smallest non-zero variance instead.

Then :func:`~sdo_lightning.sampling.sample`'s loop runs at the converged trajectory: the calls the
gradient mode keeps are real network calls with their graph, every other call returns its
converged output as a constant, and the solver chain is the sequential loop's, so the gradient
flows through the kept call and the skip path exactly as in sequential SDO.

Warm start: an optimizer step changes the trajectory little, so the last converged outputs of the
same sample, chained by the solver from the new start latent, are a close first guess. A sample
is recognized by its trajectory generator's seed (``LatentOptimization`` passes one generator
per sample, seeded per sample); trajectories without per-sample generators start cold.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from sdo_lightning import registry
from sdo_lightning.contracts import Solver, SolverState
from sdo_lightning.sampling.picard_schedule import noise_variances, step_coefficients


@dataclass
class PicardStats:
    """What one Picard trajectory cost.

    Attributes:
        sweeps: batched network calls of the sweeps (each one sequential round).
        rounds: sequential rounds of network calls: the sweeps plus the calls with a graph.
        evaluations: network evaluations, one per sample and step (a sweep of ``k`` steps over
            ``B`` samples is ``k * B``; classifier-free guidance's doubling not counted).
        warm: samples that started from a stored trajectory.
        samples: samples in the batch.
        steps: network calls of the trajectory.
        frontier: after each sweep, the number of steps that are final.
    """

    sweeps: int = 0
    rounds: int = 0
    evaluations: int = 0
    warm: int = 0
    samples: int = 0
    steps: int = 0
    frontier: list[int] = field(default_factory=list)


class Picard(Solver):
    """Parallel sampling by Picard iteration (ParaDiGMS) around a first-order solver.

    The no-graph network calls of a trajectory are computed in sweeps, each one batched network
    call over a window of steps, until every step's residual is within the tolerance; then the
    gradient mode's kept calls run with their graph at the converged trajectory. Wraps
    :class:`~sdo_lightning.solvers.DDIM` (``eta=0``) or
    :class:`~sdo_lightning.solvers.FlowMatchEuler`; the denoiser must accept one timestep per row
    of its input (every built-in backbone does).

    Args:
        solver: the wrapped first-order solver; it sets the schedule and the final solver chain.
        tolerance: ParaDiGMS's tolerance on the per-step residual, relative to the step's noise
            magnitude (0.1 in the ParaDiGMS pipeline; 0 iterates until the guess no longer changes,
            which is sequential sampling to float rounding).
        window: steps per sweep (ParaDiGMS's batch window ``p``; 10 as in its pipeline): one
            network call of ``window`` times the batch; None: the whole trajectory.
        max_sweeps: after this many sweeps the remaining steps run one per sweep (sequentially),
            so the result always meets the tolerance; None: no limit (at most N sweeps anyway).
        warm_start: start a sample from its last converged trajectory (same generator seed).
        exact_final: compute the latents whose noise magnitude is 0 (the last ones) exactly, as
            ParaDiGMS does (one more single-step sweep at the end); False holds them to the
            tolerance at the smallest non-zero noise magnitude.
        cache_size: trajectories kept for warm starts (least recently used dropped first); each
            holds N network outputs of one sample, on the latents' device.
    """

    def __init__(
        self,
        solver: Solver,
        tolerance: float = 0.1,
        window: int | None = 10,
        max_sweeps: int | None = None,
        warm_start: bool = True,
        exact_final: bool = True,
        cache_size: int = 256,
    ) -> None:
        first_order = " and ".join(name for name, cls in registry.classes("solvers").items() if cls.first_order)
        if solver.unwrap() is not solver:
            raise ValueError(f"Picard wraps a solver, not another {type(solver).__name__}; give it {first_order}.")
        why = solver.nondeterminism()
        if solver.first_order and why is not None:
            raise ValueError(f"Picard needs a deterministic solver, but {type(solver).__name__} {why}.")
        if not solver.first_order:
            raise ValueError(
                f"Picard supports the first-order solvers {first_order} (deterministic), not {type(solver).__name__} "
                "(a multistep or stochastic solver's step is not a function of the current latent alone)."
            )
        if tolerance < 0:
            raise ValueError(f"Picard tolerance must be >= 0, got {tolerance}.")
        if window is not None and window < 1:
            raise ValueError(f"Picard window must be >= 1 (or None for the whole trajectory), got {window}.")
        if max_sweeps is not None and max_sweeps < 1:
            raise ValueError(f"Picard max_sweeps must be >= 1 (or None), got {max_sweeps}.")
        if cache_size < 0:
            raise ValueError(f"Picard cache_size must be >= 0, got {cache_size}.")
        self.solver = solver
        self.tolerance = tolerance
        self.window = window
        self.max_sweeps = max_sweeps
        self.warm_start = warm_start
        self.exact_final = exact_final
        self.cache_size = cache_size
        #: the cost of the last trajectory, and the sums over all trajectories since construction
        self.last = PicardStats()
        self.total = PicardStats()
        self._cache: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()

    # -- the wrapped solver's schedule and verbs ----------------------------------------------
    num_inference_steps = property(lambda self: self.solver.num_inference_steps,
                                   lambda self, v: setattr(self.solver, "num_inference_steps", v))
    start_timestep = property(lambda self: self.solver.start_timestep,
                              lambda self, v: setattr(self.solver, "start_timestep", v))
    scheduler_kwargs = property(lambda self: self.solver.scheduler_kwargs)

    @property
    def scheduler_cls(self) -> type:  # type: ignore[override]
        return self.solver.scheduler_cls

    def __copy__(self) -> "Picard":
        # a copy whose schedule is changed (a prefix sampler) must not change this one's solver
        new = object.__new__(Picard)
        new.__dict__.update(self.__dict__)
        new.solver = copy.copy(self.solver)
        # its trajectories (another schedule) and costs are its own
        new._cache, new.last, new.total = OrderedDict(), PicardStats(), PicardStats()
        return new

    def build_scheduler(self, scheduler_config: dict[str, Any] | None = None) -> Any:
        return self.solver.build_scheduler(scheduler_config)

    def begin(self, scheduler_config: dict[str, Any] | None = None, device: torch.device | str | None = None,
              generator: torch.Generator | list[torch.Generator] | None = None) -> SolverState:
        return self.solver.begin(scheduler_config, device, generator)

    def set_timesteps(self, scheduler: Any, scheduler_config: dict[str, Any], device: torch.device | str | None) -> None:
        self.solver.set_timesteps(scheduler, scheduler_config, device)

    def scale_model_input(self, x: Tensor, t: Tensor, state: SolverState) -> Tensor:
        return self.solver.scale_model_input(x, t, state)

    def step(self, model_output: Tensor, t: Tensor, x: Tensor, state: SolverState) -> Tensor:
        return self.solver.step(model_output, t, x, state)

    def unwrap(self) -> Solver:
        return self.solver  # it sets the schedule and steps

    def __repr__(self) -> str:
        return (f"Picard({self.solver!r}, tolerance={self.tolerance}, window={self.window}, "
                f"max_sweeps={self.max_sweeps}, warm_start={self.warm_start})")

    # -- the sweeps ---------------------------------------------------------------------------
    def converge(
        self,
        denoiser: Callable[[Tensor, Tensor, Any], Tensor],
        x: Tensor,
        cond: Any = None,
        *,
        generator: torch.Generator | list[torch.Generator] | None = None,
        scheduler_config: dict[str, Any] | None = None,
        num_calls: int | None = None,
        progress: bool = False,
    ) -> tuple[Callable[[Tensor, Tensor, Any], Tensor], Solver]:
        """Run the sweeps from the start latent ``x``; return ``(denoiser, solver)`` for
        :func:`~sdo_lightning.sampling.sample`'s loop: the denoiser calls the network where grad
        mode is on (the calls the gradient mode keeps) and returns the converged output of the
        call otherwise; the solver is the wrapped one."""
        state = self.solver.begin(scheduler_config, x.device, generator)
        n = len(state.timesteps) if num_calls is None else min(num_calls, len(state.timesteps))
        stats = PicardStats(samples=len(x), steps=n)
        outputs = self._sweeps(denoiser, x.detach(), cond, state, n, scheduler_config, generator, stats, progress)
        self.last = stats
        calls = [0]

        def converged(model_in: Tensor, t: Tensor, c: Any) -> Tensor:
            i = calls[0]
            calls[0] += 1
            if torch.is_grad_enabled():  # a kept call (or its recomputation): the network, with its graph
                stats.rounds += 1
                stats.evaluations += len(model_in)
                self.total.rounds += 1
                self.total.evaluations += len(model_in)
                return denoiser(model_in, t, c)
            return outputs[i]

        return converged, self.solver

    prepare = converge  # the Solver hook sample() calls: the sweeps first

    @torch.no_grad()
    def _sweeps(self, denoiser: Callable, x: Tensor, cond: Any, state: SolverState, n: int,
                scheduler_config: dict[str, Any] | None, generator: Any, stats: PicardStats,
                progress: bool = False) -> Tensor:
        """The converged network outputs ``(n, B, ...)`` of the trajectory from ``x``."""
        a, b = step_coefficients(self.solver, scheduler_config, x.device, generator, n)
        variance = noise_variances(self.solver, state, n)
        if not self.exact_final:
            positive = variance[variance > 0]
            floor = float(positive.min()) if len(positive) else 0.0
            variance = torch.where(variance > 0, variance, torch.full_like(variance, floor))
        bound = (self.tolerance ** 2) * variance  # per latent 0..n
        timesteps = state.timesteps[:n]
        batch = len(x)

        outputs = x.new_zeros((n, *x.shape))
        warm = self._recall(outputs, generator, timesteps, batch)
        stats.warm = int(warm.sum())
        rows_warm = warm.reshape(batch, *([1] * (x.dim() - 1)))

        def advance(i: int, latent: Tensor) -> Tensor:
            return (a[i] * latent.float() + b[i] * outputs[i].float()).to(x.dtype)

        guess = x.new_empty((n + 1, *x.shape))
        guess[0] = x
        for i in range(n):  # warm samples: the stored outputs chained from the new start; cold: x
            guess[i + 1] = torch.where(rows_warm, advance(i, guess[i]), x) if stats.warm else x

        window = n if self.window is None else min(self.window, n)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="Picard sweeps", leave=False)
        begin = 0
        while begin < n:
            width = window if self.max_sweeps is None or stats.sweeps < self.max_sweeps else 1
            end = min(begin + width, n)
            k = end - begin
            model_in = torch.cat([self.solver.scale_model_input(guess[i], timesteps[i], state) for i in range(begin, end)])
            t_rows = timesteps[begin:end].repeat_interleave(batch)
            rows = torch.arange(batch, device=x.device).repeat(k)
            c_rows = None if cond is None else cond[rows.to(cond.device) if isinstance(cond, Tensor) else rows]
            try:
                out = denoiser(model_in, t_rows, c_rows)
            except (RuntimeError, ValueError) as err:
                if stats.sweeps:
                    raise
                raise type(err)(
                    "Picard calls the denoiser with one timestep per row of x (a window of steps in one batch), "
                    f"which this denoiser does not accept ({str(err).splitlines()[0][:160]}); use a built-in backbone's "
                    "denoise or sample sequentially."
                ) from err
            outputs[begin:end] = out.reshape(k, *x.shape)
            stats.sweeps += 1
            stats.evaluations += k * batch

            first_open = end
            latent = guess[begin]
            for i in range(begin, n):
                nxt = advance(i, latent)
                if i < end:
                    if first_open == end:
                        residual = (nxt.float() - guess[i + 1].float()).pow(2).flatten(1).mean(1)
                        if bool((residual > bound[i + 1]).any()):
                            first_open = i + 1  # computed from final inputs: final itself
                elif stats.warm < batch:  # cold samples wait at the window's end (ParaDiGMS)
                    nxt = torch.where(rows_warm, nxt, guess[end]) if stats.warm else guess[end].clone()
                guess[i + 1] = nxt
                latent = nxt
            if bar is not None:
                bar.update(first_open - begin)
            begin = first_open
            stats.frontier.append(begin)
        if bar is not None:
            bar.close()
        stats.rounds = stats.sweeps
        for name in ("sweeps", "rounds", "evaluations", "warm", "samples", "steps"):
            setattr(self.total, name, getattr(self.total, name) + getattr(stats, name))
        self._remember(outputs, generator, timesteps, batch)
        return outputs

    # -- warm start ---------------------------------------------------------------------------
    def _keys(self, generator: Any, batch: int) -> list[tuple] | None:
        if not self.warm_start or self.cache_size == 0 or not isinstance(generator, (list, tuple)):
            return None
        if len(generator) != batch:
            return None
        return [(g.initial_seed(), str(g.device)) for g in generator]

    def _recall(self, outputs: Tensor, generator: Any, timesteps: Tensor, batch: int) -> Tensor:
        warm = torch.zeros(batch, dtype=torch.bool, device=outputs.device)
        keys = self._keys(generator, batch)
        if keys is None:
            return warm
        for r, key in enumerate(keys):
            hit = self._cache.get(key)
            if hit is None:
                continue
            stored_t, stored = hit
            if stored.shape != outputs[:, r].shape or not torch.equal(stored_t, timesteps.cpu()):
                continue  # another schedule or shape: start cold
            outputs[:, r] = stored.to(outputs.device, outputs.dtype)
            warm[r] = True
            self._cache.move_to_end(key)
        return warm

    def _remember(self, outputs: Tensor, generator: Any, timesteps: Tensor, batch: int) -> None:
        keys = self._keys(generator, batch)
        if keys is None:
            return
        stored_t = timesteps.cpu()
        for r, key in enumerate(keys):
            self._cache[key] = (stored_t, outputs[:, r].clone())
            self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def forget(self) -> None:
        """Drop every stored trajectory (the next trajectories start cold)."""
        self._cache.clear()

    def trajectories(self, cache: OrderedDict | None = None) -> dict[str, Any]:
        """The stored trajectories (or those of ``cache``, a :meth:`snapshot`) as lists of plain
        values and CPU tensors, for a checkpoint: a resumed run starts warm where the interrupted
        one would have, so it reaches the same latents, not ones within the tolerance of them."""
        cache = self._cache if cache is None else cache
        return {"keys": [[int(seed), str(device)] for seed, device in cache],
                "timesteps": [t for t, _ in cache.values()],
                "outputs": [o.detach().cpu() for _, o in cache.values()]}

    def restore_trajectories(self, saved: dict[str, Any]) -> None:
        """Replace the stored trajectories by those :meth:`trajectories` returned."""
        self._cache = OrderedDict(((int(seed), str(device)), (t, o))
                                  for (seed, device), t, o in zip(saved["keys"], saved["timesteps"], saved["outputs"]))

    def snapshot(self) -> OrderedDict:
        """The stored trajectories as they are now (entries are replaced, never changed in place)."""
        return OrderedDict(self._cache)


__all__ = ["Picard", "PicardStats"]
