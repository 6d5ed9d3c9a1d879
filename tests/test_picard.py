"""Picard sampling (ParaDiGMS) against sequential sampling written out by hand.

References never call :func:`sdo_lightning.sample`: they are loops over the diffusers schedulers
(one network call per step, the SDO gradient by detaching every output but the kept one).
"""

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from sdo_lightning import Objective, Target, sample
from sdo_lightning.backbones import DigitsBackbone
from sdo_lightning.gradient_modes import ShortcutGradient
from sdo_lightning.sampling.picard import Picard
from sdo_lightning.solvers import DDIM, DPMSolverPlusPlus, FlowMatchEuler, LCMMultistep

from conftest import build_tiny_digits

N = 12
B = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random digits UNets (8x8): a DDPM one and a rectified-flow one."""
    ddpm = DigitsBackbone(str(build_tiny_digits(tmp_path_factory.mktemp("picard_ddpm"), seed=1)))
    flow = DigitsBackbone(str(build_tiny_digits(tmp_path_factory.mktemp("picard_flow"), seed=2, flow=True)))
    return {"ddim": ddpm, "flow": flow}


def _scheduler(name, backbone):
    if name == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(backbone.scheduler_config)
    else:
        scheduler = DDIMScheduler.from_config(backbone.scheduler_config, clip_sample=False, thresholding=False)
    scheduler.set_timesteps(N)
    return scheduler


def _inner(name):
    return FlowMatchEuler(N) if name == "flow" else DDIM(N)


def _inputs(backbone, seed=0):
    x = torch.randn(B, *backbone.latent_shape, generator=torch.Generator().manual_seed(seed))
    cond = backbone.encode_condition({"index": torch.arange(B), "class_label": torch.tensor([3, 7, 10])})
    return x, cond


def reference(name, backbone, x, cond, kept=None):
    """The sequential trajectory over the diffusers scheduler; outputs other than call ``kept``
    detached (SDO). Returns the latents x_0..x_N."""
    scheduler = _scheduler(name, backbone)
    latents = [x]
    for i, t in enumerate(scheduler.timesteps):
        out = backbone.denoise(x, t, cond)
        if i != kept:
            out = out.detach()
        x = scheduler.step(out, t, x).prev_sample
        latents.append(x)
    return latents


def generators(seed=100):
    return [torch.Generator().manual_seed(seed + i) for i in range(B)]


def trajectory(backbone, solver, x, cond, **kw):
    steps = [x]
    x0 = sample(backbone.denoise, solver, x, cond, scheduler_config=backbone.scheduler_config,
                callback=lambda step: steps.append(step.next), **kw)
    return x0, steps


def _rms(a, b):
    return float((a - b).pow(2).flatten(1).mean(1).sqrt().max())


@pytest.mark.parametrize("name", ["ddim", "flow"])
@torch.no_grad()
def test_converged_trajectory_equals_the_sequential_one_within_the_tolerance(name, models):
    backbone = models[name]
    x, cond = _inputs(backbone)
    ref = reference(name, backbone, x, cond)
    errors = {}
    for tolerance in (1e-1, 1e-3):
        picard = Picard(_inner(name), tolerance=tolerance, window=5, warm_start=False)
        x0, steps = trajectory(backbone, picard, x, cond)
        assert picard.last.sweeps < N  # fewer sequential rounds than the N sequential calls
        errors[tolerance] = max(_rms(a, r) for a, r in zip(steps, ref))
        # the tolerance is relative to the noise magnitude (at most 1): measured 6% of it or less
        assert errors[tolerance] <= tolerance
    assert errors[1e-3] < errors[1e-1]


@pytest.mark.parametrize("name", ["ddim", "flow"])
@torch.no_grad()
def test_tolerance_zero_is_sequential_sampling_to_float_rounding(name, models):
    backbone = models[name]
    x, cond = _inputs(backbone, seed=1)
    ref = reference(name, backbone, x, cond)
    picard = Picard(_inner(name), tolerance=0.0, window=4, warm_start=False)
    _, steps = trajectory(backbone, picard, x, cond)
    # every latent is recomputed until it no longer changes at all: one step per sweep
    assert picard.last.sweeps == N
    for got, want in zip(steps, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ddim", "flow"])
def test_sdo_latent_gradient_at_the_converged_trajectory(name, models):
    backbone = models[name]
    x, cond = _inputs(backbone, seed=2)
    weight = torch.linspace(-1, 1, x[0].numel()).reshape(x[0].shape)

    def loss(x0):
        return (torch.sin(3 * x0) * weight).sum()

    x_ref = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss(reference(name, backbone, x_ref, cond, kept=0)[-1]), x_ref)
    for tolerance, rtol in ((1e-2, 5e-2), (1e-4, 1e-3)):
        x_p = x.clone().requires_grad_()
        picard = Picard(_inner(name), tolerance=tolerance, window=6, warm_start=False)
        x0 = sample(backbone.denoise, picard, x_p, cond, gradient_mode=ShortcutGradient(), target=Target.latent(),
                    scheduler_config=backbone.scheduler_config)
        (got,) = torch.autograd.grad(loss(x0), x_p)
        assert picard.last.rounds == picard.last.sweeps + 1  # the kept call ran once, with its graph
        assert float((got - want).norm() / want.norm()) < rtol


def test_sdo_parameter_gradient_draws_the_same_call_and_matches(models):
    backbone = models["ddim"]
    x, cond = _inputs(backbone, seed=3)
    weight = backbone.unet.conv_out.weight
    weight.requires_grad_(True)
    try:
        kept = int(torch.randperm(N, generator=torch.Generator().manual_seed(9))[0])  # what ShortcutGradient draws
        (want,) = torch.autograd.grad(reference("ddim", backbone, x, cond, kept=kept)[-1].square().sum(), weight)
        picard = Picard(DDIM(N), tolerance=1e-4, window=N, warm_start=False)
        x0 = sample(backbone.denoise, picard, x, cond, gradient_mode=ShortcutGradient(), target=Target.parameters(),
                    plan_generator=torch.Generator().manual_seed(9), scheduler_config=backbone.scheduler_config)
        (got,) = torch.autograd.grad(x0.square().sum(), weight)
    finally:
        weight.requires_grad_(False)
    assert float((got - want).norm() / want.norm()) < 1e-3


@pytest.mark.parametrize("exact_final,sweeps", [(False, 1), (True, 2)])
@torch.no_grad()
def test_warm_start_from_the_exact_trajectory(exact_final, sweeps, models):
    backbone = models["ddim"]
    x, cond = _inputs(backbone, seed=4)
    # tolerance 0 stores the exact trajectory (to float rounding: see the test above)
    picard = Picard(DDIM(N), tolerance=0.0, window=N, exact_final=exact_final)
    first = sample(backbone.denoise, picard, x, cond, scheduler_config=backbone.scheduler_config, generator=generators())
    # at most one step per sweep (a sweep may end early where a float residual comes out exactly 0:
    # 11 of 12 sweeps with torch 2.13), and the stored trajectory is the sequential one
    assert picard.last.warm == 0 and picard.last.sweeps <= N
    torch.testing.assert_close(first, reference("ddim", backbone, x, cond)[-1], rtol=1e-5, atol=1e-5)
    # the same samples again (generators with the same seeds)
    picard.tolerance = 0.05
    again = sample(backbone.denoise, picard, x, cond, scheduler_config=backbone.scheduler_config, generator=generators())
    assert picard.last.warm == B
    assert picard.last.sweeps == sweeps
    # ParaDiGMS's exact end: the second sweep is the last step alone
    assert picard.last.evaluations == N * B + (sweeps - 1) * B
    torch.testing.assert_close(again, first, rtol=1e-4, atol=1e-4)
    # other samples (other seeds) start cold
    sample(backbone.denoise, picard, x, cond, scheduler_config=backbone.scheduler_config, generator=generators(500))
    assert picard.last.warm == 0


@torch.no_grad()
def test_warm_start_after_a_small_step_needs_fewer_sweeps_and_stays_within_tolerance(models):
    backbone = models["flow"]
    x, cond = _inputs(backbone, seed=5)
    picard = Picard(FlowMatchEuler(N), tolerance=1e-3, window=N)
    sample(backbone.denoise, picard, x, cond, scheduler_config=backbone.scheduler_config, generator=generators())
    cold = picard.last.sweeps
    moved = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    _, steps = trajectory(backbone, picard, moved, cond, generator=generators())
    assert picard.last.warm == B and picard.last.sweeps < cold
    ref = reference("flow", backbone, moved, cond)
    assert max(_rms(a, r) for a, r in zip(steps, ref)) <= 1e-2


def test_refusals():
    with pytest.raises(ValueError, match="eta=0.5; set eta: 0"):
        Picard(DDIM(4, eta=0.5))
    for solver in (DPMSolverPlusPlus(4), LCMMultistep(4)):
        with pytest.raises(ValueError, match="first-order solvers DDIM"):
            Picard(solver)
    with pytest.raises(ValueError, match="not another Picard"):
        Picard(Picard(DDIM(4)))
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        Picard(DDIM(4), tolerance=-1)
    with pytest.raises(ValueError, match="window must be >= 1"):
        Picard(DDIM(4), window=0)


@torch.no_grad()
def test_a_clamping_step_is_refused_when_sampling(models):
    backbone = models["ddim"]
    x, cond = _inputs(backbone)
    picard = Picard(DDIM(N, scheduler_kwargs={"clip_sample": True, "clip_sample_range": 0.1}))
    with pytest.warns(UserWarning, match="clip_sample"), pytest.raises(ValueError, match="affine"):
        sample(backbone.denoise, picard, x, cond, scheduler_config=backbone.scheduler_config)


def test_copy_with_another_schedule_leaves_the_original_alone():
    import copy

    picard = Picard(DDIM(10, start_timestep=600))
    prefix = copy.copy(picard)
    prefix.start_timestep = None
    assert picard.start_timestep == 600 and prefix.start_timestep is None
    assert picard.unwrap() is picard.solver and picard.solver.unwrap() is picard.solver


class _Brightness(Objective, register=False):
    """A per-sample non-linear loss on the decoded images."""

    def forward(self, images, batch):
        return torch.sin(3 * images).flatten(1).mean(1)


def test_latent_optimization_warm_starts_from_its_previous_step(tiny_digits_dir, tmp_path):
    """A fit of the module as it is: its per-sample trajectory generators key the stored
    trajectories, so every step starts warm (the first from the prepared samples), and the result
    is that of the sequential fit within the tolerance."""
    from lightning.pytorch import Trainer

    from sdo_lightning.training.data import SampleSet
    from sdo_lightning.modules.latent_optimization import LatentOptimization

    def fit(solver):
        module = LatentOptimization(objective=_Brightness(), backbone=DigitsBackbone(tiny_digits_dir), solver=solver)
        warm = []
        if isinstance(solver, Picard):
            module.on_train_batch_end = lambda *args: warm.append(solver.last.warm)
        trainer = Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
        trainer.fit(module, datamodule=SampleSet(num_samples=2, class_label=[1, 2]))
        return module.variable.detach(), warm

    got, warm = fit(Picard(DDIM(8), tolerance=1e-4))
    want, _ = fit(DDIM(8))
    assert warm == [2, 2, 2]
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_reward_finetuning_with_picard_trains_the_adapters_as_sequential_sampling(tiny_digits_dir, tmp_path):
    """RewardFineTuning as it is (adapters folded for the no-graph calls, one kept call drawn per
    step): with Picard the adapters after two steps are those of sequential sampling. Its samples
    are new every step (seeds per step), so nothing starts warm."""
    from lightning.pytorch import Trainer

    from sdo_lightning.training.data import SampleSet
    from sdo_lightning.modules.reward_finetuning import RewardFineTuning

    def fit(solver):
        torch.manual_seed(0)  # the adapters' initialization
        module = RewardFineTuning(objective=_Brightness(), backbone=DigitsBackbone(tiny_digits_dir), solver=solver,
                                  lr=0.05, evaluation=None)
        warm, stored = [], []
        if isinstance(solver, Picard):
            def record(*args):
                warm.append(solver.last.warm)
                stored.append(len(solver._cache))
                RewardFineTuning.on_train_batch_end(module, *args)  # which forgets the step's trajectories

            module.on_train_batch_end = record
        trainer = Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
        trainer.fit(module, datamodule=SampleSet(num_samples=2))
        return [p.detach().clone() for p in module.lora_params], warm, stored

    picard = Picard(DDIM(6), tolerance=1e-4)
    got, warm, stored = fit(picard)
    want, _, _ = fit(DDIM(6))
    assert warm == [0, 0]
    # each step stored its 2 samples' trajectories, and nothing outlives the step (no dead cache on the device)
    assert stored == [2, 2] and len(picard._cache) == 0
    assert any(float(w.abs().max()) > 0 for w in want)
    # Adam moves every weight by about lr = 0.05 per step: agreement to 1% of that
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-2, atol=5e-4)


@torch.no_grad()
def test_guided_backbones_take_one_timestep_per_row(tmp_path, tiny_digits_dir):
    """Classifier-free guidance doubles the batch inside the denoiser: the pixel and Stable
    Diffusion backbones repeat the per-row timesteps of a sweep the same way (prompt embeddings
    repeated by TextCondition's rows)."""
    from sdo_lightning.backbones import StableDiffusionBackbone

    from sdo_lightning.testing.tiny_models import build_tiny_sd

    sd = StableDiffusionBackbone(str(build_tiny_sd(tmp_path / "sd")), guidance_scale=2.0)
    digits = DigitsBackbone(str(tiny_digits_dir), guidance_scale=2.0)
    cases = [(sd, sd.encode_condition({"prompt": ["a cat", "a dog", "a red car"]})),
             (digits, digits.encode_condition({"index": torch.arange(B), "class_label": torch.tensor([3, 7, 1])}))]
    for backbone, cond in cases:
        x = torch.randn(B, *backbone.latent_shape, generator=torch.Generator().manual_seed(7))
        ref = reference("ddim", backbone, x, cond)
        picard = Picard(DDIM(N), tolerance=1e-3, window=6)
        _, steps = trajectory(backbone, picard, x, cond)
        assert picard.last.sweeps < N
        assert max(_rms(a, r) for a, r in zip(steps, ref)) <= 1e-3
