"""Each solver's loop equals a hand-written loop over the same diffusers scheduler."""

import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

from sdo_lightning import Solver, sample
from sdo_lightning import registry
from sdo_lightning.solvers import DDIM, LCMMultistep, DPMSolverPlusPlus

CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def reference_loop(scheduler, net, x, steps, step_kwargs, begin=0):
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[begin:]
    if begin and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    for t in timesteps:
        x = scheduler.step(net(x, t), t, x, **step_kwargs).prev_sample
    return x


CASES = [
    (DDIM(12), DDIMScheduler(**CONFIG, clip_sample=False), {}),
    (DDIM(12, eta=1.0), DDIMScheduler(**CONFIG, clip_sample=False), {"eta": 1.0, "gen": True}),
    (DPMSolverPlusPlus(12, order=1), DPMSolverMultistepScheduler(**CONFIG, solver_order=1), {}),
    (DPMSolverPlusPlus(12, order=2), DPMSolverMultistepScheduler(**CONFIG, solver_order=2), {}),
    (DPMSolverPlusPlus(12, order=3), DPMSolverMultistepScheduler(**CONFIG, solver_order=3), {}),
    (LCMMultistep(4), LCMScheduler(**CONFIG), {"gen": True}),
]


@pytest.mark.parametrize("solver,scheduler,kw", CASES, ids=lambda c: repr(c)[:40] if isinstance(c, Solver) else "")
@torch.no_grad()
def test_solver_matches_hand_written_loop(solver, scheduler, kw, denoiser):
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    net = lambda x, t: denoiser(x, t)
    step_kwargs = {k: v for k, v in kw.items() if k != "gen"}
    if kw.get("gen"):
        step_kwargs["generator"] = torch.Generator().manual_seed(7)
    expected = reference_loop(scheduler, net, x, solver.num_inference_steps, step_kwargs)
    gen = torch.Generator().manual_seed(7) if kw.get("gen") else None
    got = sample(lambda x, t, c: denoiser(x, t), solver, x, generator=gen, scheduler_config=CONFIG)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, x)


@pytest.mark.parametrize("solver_cls,scheduler_cls", [(DDIM, DDIMScheduler), (DPMSolverPlusPlus, DPMSolverMultistepScheduler)])
@torch.no_grad()
def test_start_at_intermediate_timestep(solver_cls, scheduler_cls, denoiser):
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    solver = solver_cls(20, start_timestep=600, scheduler_kwargs={"clip_sample": False} if solver_cls is DDIM else None)
    state = solver.begin(CONFIG)
    assert int(state.timesteps[0]) <= 600 and len(state.timesteps) < 20
    full = scheduler_cls.from_config(solver.build_scheduler(CONFIG).config)
    full.set_timesteps(20)
    begin = int((full.timesteps > 600).sum())
    assert int(full.timesteps[begin]) == int(state.timesteps[0])  # the first timestep <= 600
    ref = scheduler_cls.from_config(full.config)
    expected = reference_loop(ref, lambda x, t: denoiser(x, t), x, 20, {}, begin=begin)
    got = sample(lambda x, t, c: denoiser(x, t), solver, x, scheduler_config=CONFIG)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_start_timestep_below_schedule_is_an_error():
    with pytest.raises(ValueError, match="start_timestep"):
        DDIM(10, start_timestep=-1).begin(CONFIG)


@pytest.mark.parametrize("name", registry.names("solvers"))
@torch.no_grad()
def test_every_solver_has_fresh_state_per_trajectory(name, denoiser):
    """Contract test over every registered solver: two trajectories with the same seed agree."""
    cls = registry.classes("solvers")[name]
    solver = cls(DDIM(4)) if name == "Picard" else cls(num_inference_steps=4)  # Picard wraps a solver
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    run = lambda: sample(lambda x, t, c: denoiser(x, t), solver, x, generator=torch.Generator().manual_seed(5), scheduler_config=CONFIG)
    first, second = run(), run()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert torch.isfinite(first).all()


def test_stochastic_solver_follows_generator(denoiser):
    solver = DDIM(6, eta=1.0)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        a = sample(lambda x, t, c: denoiser(x, t), solver, x, generator=torch.Generator().manual_seed(0))
        b = sample(lambda x, t, c: denoiser(x, t), solver, x, generator=torch.Generator().manual_seed(1))
    assert (a - b).abs().max() > 1e-3


def test_clip_sample_warns_and_saturation_kills_the_skip_path(denoiser):
    solver = DDIM(6, scheduler_kwargs={"clip_sample": True, "clip_sample_range": 1e-3})
    x = (3 * torch.randn(1, 1, 8, 8)).requires_grad_()
    with pytest.warns(UserWarning, match="clip_sample=True"):
        from sdo_lightning.gradient_modes import ShortcutGradient

        x0 = sample(lambda x, t, c: denoiser(x, t), solver, x, gradient_mode=ShortcutGradient())
    (grad,) = torch.autograd.grad(x0.sum(), x)
    # Measured fact behind the warning: with the clamp saturated, the SDO gradient is exactly 0.
    assert grad.abs().max() == 0


def test_default_solvers_say_once_that_they_turn_the_models_clamp_off(recwarn, denoiser):
    """A model config with clip_sample / thresholding on (e.g. google/ddpm-ema-celebahq-256) is
    sampled with them off: each solver says so once (not every trajectory), and the clamp
    warning does not fire, since the scheduler really runs without the clamp."""
    for solver in (DDIM(3), DPMSolverPlusPlus(3), LCMMultistep(2)):
        for _ in range(3):
            scheduler = solver.begin({"clip_sample": True, "thresholding": True}).scheduler
        assert not scheduler.config.thresholding
        assert not getattr(scheduler.config, "clip_sample", False) or isinstance(solver, DPMSolverPlusPlus)  # not its option
    notes = [str(w.message) for w in recwarn if "which this solver turns off" in str(w.message)]
    assert [n.split(":")[0] for n in notes] == ["DDIM", "DPMSolverPlusPlus", "LCMMultistep"]
    assert "clip_sample: true and thresholding: true" in notes[0]
    assert "scheduler_kwargs: {clip_sample: true, thresholding: true}" in notes[0]
    assert "thresholding: true" in notes[1]  # DPM-Solver++ has no clip_sample
    assert not [w for w in recwarn if "clamps the predicted x_0" in str(w.message)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user's own choice is not second-guessed
        DDIM(3, scheduler_kwargs={"clip_sample": False}).begin({"clip_sample": True})


#: built-in solvers whose reference loop is in another file (FlowMatchEuler's diffusers loop; Picard
#: wraps a solver and is compared with sequential sampling)
REFERENCE_ELSEWHERE = {"FlowMatchEuler": "test_flow_solver.py", "Picard": "test_picard.py"}


def test_every_builtin_solver_has_a_hand_written_reference_loop():
    """docs/adding-a-solver.md: a new solver adds its case to CASES (or names its test file above)."""
    builtin = {n for n, c in registry.classes("solvers").items() if c.__module__.startswith("sdo_lightning.")}
    assert builtin == {type(s).__name__ for s, _, _ in CASES} | set(REFERENCE_ELSEWHERE)


@pytest.mark.parametrize("name", registry.names("solvers"))
def test_every_solver_says_what_kind_it_is(name):
    """Contract test over every registered solver: what the network predicts, whether a wrapper,
    and Picard takes exactly the deterministic first-order ones, by those attributes alone."""
    from sdo_lightning.sampling.picard import Picard

    cls = registry.classes("solvers")[name]
    solver = cls(DDIM(4)) if name == "Picard" else cls(num_inference_steps=4)  # Picard wraps a solver
    assert solver.predicts in ("noise", "sample", "velocity") and isinstance(solver.first_order, bool)
    inner = solver.unwrap()
    assert inner.unwrap() is inner and inner.predicts == solver.predicts
    if inner is not solver:
        return
    if solver.first_order and solver.nondeterminism() is None:
        assert Picard(solver).unwrap() is solver
    else:
        with pytest.raises(ValueError, match="Picard"):
            Picard(solver)
