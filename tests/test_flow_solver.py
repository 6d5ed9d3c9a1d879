"""FlowMatchEuler: the schedules the SD3 and FLUX pipelines set, the Euler step, the SDO
gradient through it, and Euler inversion, each against a closed form written here."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sdo_lightning import sample
from sdo_lightning.gradient_modes import ShortcutGradient
from sdo_lightning.sampling.inversion import invert
from sdo_lightning.solvers import FlowMatchEuler


def shifted(sigma, shift):
    return shift * sigma / (1 + (shift - 1) * sigma)


def test_static_shift_is_applied_as_diffusers_does_twice_at_the_ends():
    """shift 3, 4 steps: the scheduler's sigma range is itself shifted, then the linspace over it
    is shifted again, giving [1, .858, .602, .0089, 0] (the measured trap in DESIGN.md)."""
    config = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    state = FlowMatchEuler(4).begin(config)
    lo = shifted(1 / 1000, 3.0)  # sigma_min of the shifted training schedule
    expected = [shifted(s, 3.0) for s in np.linspace(1.0, lo, 4)] + [0.0]
    torch.testing.assert_close(state.scheduler.sigmas.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=2e-6)
    torch.testing.assert_close(state.scheduler.sigmas[:4], torch.tensor([1.0, 0.8577, 0.6022, 0.0089]), atol=1e-4, rtol=0)
    torch.testing.assert_close(state.timesteps, state.scheduler.sigmas[:4] * 1000)


def test_flux_schedule_linspace_sigmas_and_dynamic_mu():
    """FLUX: sigmas linspace(1, 1/N, N), exponentially time-shifted by mu: e^mu / (e^mu + 1/s - 1)."""
    config = dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0).config)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256)  # calculate_shift for 1024 tokens
    config["sdo_set_timesteps"] = {"mu": mu, "sigmas": "linspace"}
    state = FlowMatchEuler(4).begin(config)
    expected = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in np.linspace(1.0, 1 / 4, 4)] + [0.0]
    torch.testing.assert_close(state.scheduler.sigmas.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=2e-6)


def test_dynamic_shifting_without_mu_is_a_clear_error():
    config = dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    with pytest.raises(ValueError, match="dynamic shifting, which needs the mu"):
        FlowMatchEuler(4).begin(config)


def test_trajectory_and_sdo_gradient_match_the_euler_closed_form(denoiser):
    """x_{i+1} = x_i + (s_{i+1} - s_i) v(x_i, t_i); with only call 0 differentiable the latent
    gradient is g + (s_1 - s_0) J_v(x_T)^T g, g = dJ/dx_0 (the skip coefficient is 1)."""
    steps, shift = 5, 2.0
    config = dict(FlowMatchEulerDiscreteScheduler(shift=shift).config)
    lo = shifted(1 / 1000, shift)
    sigmas = [shifted(s, shift) for s in np.linspace(1.0, lo, steps)] + [0.0]
    net = lambda x, t: denoiser(x, t)  # noqa: E731
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    denoiser.double()

    x = x_T.clone()
    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * net(x, torch.tensor(sigmas[i] * 1000))
    got = sample(lambda x, t, c: net(x, t), FlowMatchEuler(steps), x_T, scheduler_config=config)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-6)  # the scheduler's sigmas are float32

    w = torch.linspace(-1, 1, x_T.numel(), dtype=torch.float64).reshape(x_T.shape)
    x_var = x_T.clone().requires_grad_()
    x0 = sample(lambda x, t, c: net(x, t), FlowMatchEuler(steps), x_var, scheduler_config=config,
                gradient_mode=ShortcutGradient())
    (sdo,) = torch.autograd.grad((torch.sin(x0) * w).sum(), x_var)
    g = torch.cos(x0.detach()) * w
    first = x_T.clone().requires_grad_()
    (vjp,) = torch.autograd.grad(net(first, torch.tensor(1000.0)), first, g)
    torch.testing.assert_close(sdo, g + (sigmas[1] - sigmas[0]) * vjp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("start", [None, 600.0])
def test_euler_inversion_is_exact_for_a_constant_velocity(start):
    """With v independent of x, sampling adds sum (s_{i+1} - s_i) v and the inversion must remove
    it exactly: invert x0 to the trajectory's first latent, sample back, get x0."""
    v = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net = lambda x, t, cond: v.to(x.dtype)  # noqa: E731
    config = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    solver = FlowMatchEuler(10, start_timestep=start)
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    x_start = invert(net, x0, None, solver, config)
    sigmas = solver.begin(config).scheduler.sigmas
    first = float(sigmas[0] if start is None else sigmas[sigmas * 1000 <= start][0])
    torch.testing.assert_close(x_start, x0 + first * v, rtol=0, atol=1e-6)  # x_0 + (s_first - 0) v
    back = sample(net, solver, x_start, scheduler_config=config)
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-6)


def test_a_flow_solver_and_a_diffusion_model_are_refused_together(tiny_digits_dir):
    from types import SimpleNamespace

    from diffusers import UNet2DModel

    from sdo_lightning.backbones import DigitsBackbone, PixelUNetBackbone
    from sdo_lightning.modules.base import check_solver_fits_backbone
    from sdo_lightning.solvers import DDIM

    with pytest.raises(ValueError, match="holds a diffusion model .* cannot sample; use solver DDIM"):
        check_solver_fits_backbone(FlowMatchEuler(4), DigitsBackbone(tiny_digits_dir))
    flow = PixelUNetBackbone.from_pipeline(SimpleNamespace(unet=UNet2DModel.from_pretrained(tiny_digits_dir / "unet"),
                                                           scheduler=FlowMatchEulerDiscreteScheduler()))
    assert flow.flow_matching
    with pytest.raises(ValueError, match="holds a rectified-flow model .* use solver FlowMatchEuler"):
        check_solver_fits_backbone(DDIM(4), flow)
    check_solver_fits_backbone(FlowMatchEuler(4), flow)  # fits: no error
