"""DDIM inversion (sdo_lightning.sampling.inversion.ddim_invert) for epsilon, v and x0 ("sample") networks.

References are computed independently of the code under test: diffusers' ``DDIMInverseScheduler``
run by hand on the same network, and closed forms of networks for which DDIM sampling is exactly
invertible.
"""

import math

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from sdo_lightning import sample
from sdo_lightning.sampling.inversion import ddim_invert
from sdo_lightning.solvers import DDIM

CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
# Stable Diffusion 2.x 768-v's scheduler: v-prediction, steps_offset 1, set_alpha_to_one false
SD2_V = {**CONFIG, "prediction_type": "v_prediction", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}


def diffusers_inversion(net, x0, solver, config):
    """The loop diffusers' inverting pipelines run, with ``DDIMInverseScheduler`` set up to visit
    the timesteps ``solver`` samples, in float64.

    Correspondence with ``DDIM(n, start_timestep=s)`` (checked below, not assumed):
    - ``set_timesteps(n)``: for "leading" spacing both schedulers take ``k * (1000 // n) + steps_offset``,
      for "trailing" ``round(1000 - k * 1000 / n) - 1``; the inverse one in ascending order, so the
      solver's timesteps <= s are the first ``len(...)`` of them.
    - each step at t starts from the level ``t - 1000 // n``, exactly the level DDIMScheduler's step at t
      lands on, and below 0 from ``initial_alpha_cumprod``, DDIMScheduler's ``final_alpha_cumprod``
      (1 with ``set_alpha_to_one``, else alphas_cumprod[0]).
    - ``clip_sample`` defaults to True in DDIMInverseScheduler and False in the project's DDIM: off here.
    - "linspace" spacing (DDIMScheduler only) has no DDIMInverseScheduler counterpart: not compared.
    """
    inverse = DDIMInverseScheduler.from_config({**config, "clip_sample": False})
    inverse.set_timesteps(solver.num_inference_steps)
    inverse.alphas_cumprod = inverse.alphas_cumprod.double()
    inverse.initial_alpha_cumprod = inverse.initial_alpha_cumprod.double()
    visited = solver.begin(config).timesteps
    timesteps = inverse.timesteps[: len(visited)]
    assert timesteps.tolist() == visited.flip(0).tolist()
    x = x0.clone()
    for t in timesteps:
        x = inverse.step(net(x, t, None), t, x).prev_sample
    return x


COMPARED = [  # (scheduler config, solver)
    (CONFIG, DDIM(25, start_timestep=600)),
    ({**CONFIG, "prediction_type": "v_prediction"}, DDIM(25, start_timestep=600)),
    (SD2_V, DDIM(20, start_timestep=700)),
    ({**CONFIG, "steps_offset": 1, "set_alpha_to_one": False}, DDIM(20, start_timestep=700)),
    # 1000 // 12 = 83 while trailing timesteps are 83 or 84 apart: steps start off the previous timestep
    ({**CONFIG, "timestep_spacing": "trailing"}, DDIM(12)),
    ({**CONFIG, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, DDIM(12)),
    # x0 networks: set_alpha_to_one false (the first step from alpha_bar = 1 has no eps, see below)
    ({**CONFIG, "prediction_type": "sample", "set_alpha_to_one": False}, DDIM(10, start_timestep=500)),
]


@pytest.mark.parametrize("config,solver", COMPARED, ids=["eps", "v", "sd2-v", "sd-eps", "trailing-eps", "trailing-v", "sample"])
def test_matches_diffusers_ddim_inverse_scheduler(config, solver, denoiser):
    net = denoiser.double()
    f = lambda x, t, cond: net(x, t)
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    expected = diffusers_inversion(f, x0, solver, config)
    got = ddim_invert(f, x0, None, solver, config)
    assert got.dtype == torch.float64
    # Both run float64 arithmetic on the same float32-built alphas (measured difference: 0, the
    # same operations in the same order); 1e-10 leaves room for reordering, while a wrong convention
    # is off by O(0.01-1) (epsilon read for v: 2.3; previous timestep instead of t - 1000 // n: 0.02).
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert (got - x0).abs().max() > 0.1


def test_v_prediction_is_not_epsilon(denoiser):
    """The comparison above tells the conventions apart: on the same v network, reading the output
    as epsilon (what ddim_invert did before it followed prediction_type) lands far away."""
    net = denoiser.double()
    f = lambda x, t, cond: net(x, t)
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    solver = DDIM(25, start_timestep=600)
    as_v = diffusers_inversion(f, x0, solver, {**CONFIG, "prediction_type": "v_prediction"})
    as_eps = diffusers_inversion(f, x0, solver, CONFIG)
    assert (as_v - as_eps).abs().max() > 0.1


def test_ddim_inversion_is_the_exact_inverse_for_a_constant_network():
    """With an output that does not depend on (x, t), DDIM sampling is an affine map and the
    inversion must undo it exactly: invert x0 to x_600, sample back, get x0."""
    c = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    net = lambda x, t, cond: c.to(x.dtype)
    solver = DDIM(25, start_timestep=600)  # set_alpha_to_one (default): the last step reaches alpha = 1
    x_t = ddim_invert(net, x0, None, solver, CONFIG)
    assert (x_t - x0).abs().max() > 0.1
    back = sample(net, solver, x_t, scheduler_config=CONFIG)
    torch.testing.assert_close(back, x0, rtol=1e-7, atol=1e-7)


SCHEDULES = [  # (config, solver) where the constant-output round trips below must be exact
    (CONFIG, DDIM(25, start_timestep=600)),
    ({**CONFIG, "set_alpha_to_one": False, "steps_offset": 1}, DDIM(20, start_timestep=700)),  # x0 at alphas_cumprod[0]
    ({**CONFIG, "timestep_spacing": "trailing"}, DDIM(12)),
    ({**CONFIG, "timestep_spacing": "linspace"}, DDIM(12, start_timestep=800)),
]


@pytest.mark.parametrize("config,solver", SCHEDULES, ids=["leading", "sd-like", "trailing", "linspace"])
def test_constant_epsilon_round_trip_is_exact_on_every_schedule(config, solver):
    """The exact inverse needs the levels DDIM's step lands on (t - 1000 // n, not always the
    previous timestep) and the scheduler's final alpha (alphas_cumprod[0] without set_alpha_to_one)."""
    c = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    net = lambda x, t, cond: c
    x_t = ddim_invert(net, x0, None, solver, config)
    assert (x_t - x0).abs().max() > 0.1
    # sampling back runs DDIMScheduler.step, whose coefficients are float32 (sqrt of float32 alphas):
    # the round trip is exact up to float32 rounding (measured <= 6.6e-7, the wrong level or final
    # alpha gives 0.02-0.4), hence 2e-6
    torch.testing.assert_close(sample(net, solver, x_t, scheduler_config=config), x0, rtol=0, atol=2e-6)


def rotate(x):
    """J: a quarter turn in each (channel 0, channel 1) plane; J(J(x)) = -x."""
    return torch.stack([-x[:, 1], x[:, 0]], dim=1)


@pytest.mark.parametrize("config,solver", SCHEDULES, ids=["leading", "sd-like", "trailing", "linspace"])
def test_v_prediction_round_trip_is_exact_for_a_rotation_network(config, solver):
    """The v analogue of the constant epsilon network: ``v(x, t) = J x`` with J a quarter turn.

    With phi = arccos(sqrt(alpha_bar)), x = cos(phi) x0 + sin(phi) eps and v = cos(phi) eps - sin(phi) x0
    = dx/dphi. Reading v = J x at any level phi_s gives x0_hat = R(-phi_s) x, eps = R(pi/2 - phi_s) x with
    R(theta) = cos(theta) + sin(theta) J, so the DDIM step from phi_s to phi_t is the rotation
    R(phi_t - phi_s): sampling and inversion are rotations by opposite angles, whatever the timesteps."""
    config = {**config, "prediction_type": "v_prediction"}
    x0 = torch.rand(2, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    net = lambda x, t, cond: rotate(x)
    x_t = ddim_invert(net, x0, None, solver, config)

    # closed form: the sum of the rotation angles of the steps DDIMScheduler takes
    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(solver.num_inference_steps)
    alphas = ddim.alphas_cumprod.double()
    final = float(ddim.final_alpha_cumprod)
    phi = lambda a: math.acos(math.sqrt(float(a)))
    stride = 1000 // solver.num_inference_steps
    angle = sum(phi(alphas[t]) - phi(alphas[t - stride] if t >= stride else final) for t in solver.begin(config).timesteps.tolist())
    assert angle > 0.5
    torch.testing.assert_close(x_t, math.cos(angle) * x0 + math.sin(angle) * rotate(x0), rtol=1e-10, atol=1e-10)

    torch.testing.assert_close(sample(net, solver, x_t, scheduler_config=config), x0, rtol=0, atol=2e-6)  # float32 steps, as above


def test_unknown_prediction_type_is_an_error():
    with pytest.raises(ValueError, match="prediction_type 'flow_prediction'.*'epsilon', 'v_prediction', 'sample'"):
        ddim_invert(lambda x, t, c: x, torch.zeros(1, 1, 4, 4), None, DDIM(4), {**CONFIG, "prediction_type": "flow_prediction"})


def test_x0_network_from_alpha_one_is_an_error():
    """At alpha_bar = 1 an x0 prediction gives eps = (x - x0_hat) / 0: refused, not inf/nan."""
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        ddim_invert(lambda x, t, c: x, torch.zeros(1, 1, 4, 4), None, DDIM(4), {**CONFIG, "prediction_type": "sample"})
