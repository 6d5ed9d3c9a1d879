"""Gradients of every mode against independent computations.

References here never call :func:`sdo_lightning.sample`: they are separate loops over the
diffusers schedulers, or closed forms built from the scheduler's alphas.
"""

import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

from sdo_lightning import Target, sample
from sdo_lightning import registry
from sdo_lightning.gradient_modes import DRTune, FullBackprop, ShortcutGradient, TruncatedBackprop
from sdo_lightning.solvers import DDIM, DPMSolverPlusPlus, FlowMatchEuler, LCMMultistep

CONFIG = {"num_train_timesteps": 1000}
N = 6


def objective(x0):
    # A fixed non-linear metric so that dJ/dx0 varies over pixels.
    w = torch.linspace(-1, 1, x0.numel()).reshape(x0.shape)
    return (torch.sin(x0) * w).sum() + 0.1 * (x0**2).sum()


SOLVERS = {
    "ddim": (lambda: DDIM(N), lambda: DDIMScheduler(**CONFIG, clip_sample=False), False),
    "ddim_eta": (lambda: DDIM(N, eta=0.7), lambda: DDIMScheduler(**CONFIG, clip_sample=False), True),
    "dpm2m": (lambda: DPMSolverPlusPlus(N), lambda: DPMSolverMultistepScheduler(**CONFIG), False),
    "dpm3": (lambda: DPMSolverPlusPlus(N, order=3), lambda: DPMSolverMultistepScheduler(**CONFIG, solver_order=3), False),
    "lcm": (lambda: LCMMultistep(4), lambda: LCMScheduler(**CONFIG), True),
    "flow": (lambda: FlowMatchEuler(N), lambda: FlowMatchEulerDiscreteScheduler(), False),
}


def reference_sdo_latent(scheduler, net, x_start, steps, seed):
    """SDO by hand: every network output but the first is detached."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = x_start
    for i, t in enumerate(scheduler.timesteps):
        eps = net(x, t)
        if i > 0:
            eps = eps.detach()
        kw = {"eta": 0.7} if isinstance(scheduler, DDIMScheduler) and steps == N and seed == 11 else {}
        x = scheduler.step(eps, t, x, generator=gen, **kw).prev_sample
    return x


@pytest.mark.parametrize("name", SOLVERS)
def test_sdo_latent_gradient_equals_reference_loop(name, denoiser):
    make_solver, make_scheduler, stochastic = SOLVERS[name]
    solver = make_solver()
    seed = 11 if name == "ddim_eta" else 3
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    x0 = sample(lambda x, t, c: denoiser(x, t), solver, x, gradient_mode=ShortcutGradient(),
                generator=torch.Generator().manual_seed(seed))
    (got,) = torch.autograd.grad(objective(x0), x)
    ref_x0 = reference_sdo_latent(make_scheduler(), lambda x, t: denoiser(x, t), x, solver.num_inference_steps, seed)
    (expected,) = torch.autograd.grad(objective(ref_x0), x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got.abs().sum() > 0


def test_sdo_latent_gradient_ddim_closed_form(denoiser):
    """DDIM (eta=0) is x_{i+1} = a_i x_i + b_i eps_i, so with only call 0 differentiable:
    dJ/dx_N = prod(a) g + prod(a_1..) b_0 J_eps0^T g, where g = dJ/dx_0."""
    steps = 8
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4)).requires_grad_()
    x0 = sample(lambda x, t, c: denoiser(x, t), DDIM(steps), x, gradient_mode=ShortcutGradient())
    (got,) = torch.autograd.grad(objective(x0), x)

    # Coefficients from the alphas, written out independently of diffusers' step().
    betas = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    ts = [t * (1000 // steps) + 1 for t in reversed(range(steps))]  # "leading" spacing, offset 1
    ts = [t - 1 for t in ts]
    a, b = [], []
    for t in ts:
        prev = t - 1000 // steps
        ab_t, ab_p = abar[t], (abar[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64))
        a.append(torch.sqrt(ab_p / ab_t))
        b.append(torch.sqrt(1 - ab_p) - torch.sqrt(ab_p * (1 - ab_t) / ab_t))
    # x_0 from the same coefficients, to obtain g = dJ/dx_0 at the true sample
    with torch.no_grad():
        xi = x.detach().double()
        for t, ai, bi in zip(ts, a, b):
            xi = ai * xi + bi * denoiser(xi.float(), torch.tensor(t)).double()
    x0_ref = xi.float().requires_grad_()
    (g,) = torch.autograd.grad(objective(x0_ref), x0_ref)
    xN = x.detach().requires_grad_()
    eps0 = denoiser(xN, torch.tensor(ts[0]))
    (vjp,) = torch.autograd.grad(eps0, xN, g)
    prod_all = torch.prod(torch.stack(a))
    prod_rest = torch.prod(torch.stack(a[1:]))
    expected = (prod_all * g.double() + prod_rest * b[0] * vjp.double()).float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", [Target.latent(), Target.parameters()], ids=["latent", "parameters"])
def test_sdo_checkpointing_agrees(target, denoiser):
    """ShortcutGradient(checkpoint=True) recomputes the kept call in backward: the same gradient
    (to rounding) as keeping its activations, for the same drawn call."""
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    wrt = [x] if target.kind == "latent" else list(denoiser.parameters())
    grads = []
    for checkpoint in (False, True):
        x0 = sample(lambda x, t, c: denoiser(x, t), DDIM(N), x, gradient_mode=ShortcutGradient(checkpoint=checkpoint),
                    target=target, plan_generator=torch.Generator().manual_seed(3))
        grads.append(torch.autograd.grad(objective(x0), wrt))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[0])


@pytest.mark.parametrize("name", SOLVERS)
def test_full_backprop_checkpointing_agrees(name, denoiser):
    make_solver, _, _ = SOLVERS[name]
    grads = []
    for ckpt in (False, True):
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
        x0 = sample(lambda x, t, c: denoiser(x, t), make_solver(), x, gradient_mode=FullBackprop(checkpoint=ckpt),
                    generator=torch.Generator().manual_seed(5))
        grads.append(torch.autograd.grad(objective(x0), [x, *denoiser.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", [Target.latent(), Target.parameters()], ids=["latent", "parameters"])
@pytest.mark.parametrize("name", SOLVERS)
def test_truncated_with_k_equal_n_is_full_backprop(name, target, denoiser):
    make_solver, _, _ = SOLVERS[name]
    grads = []
    for mode in (FullBackprop(), TruncatedBackprop(k=50)):
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
        x0 = sample(lambda x, t, c: denoiser(x, t), make_solver(), x, gradient_mode=mode, target=target,
                    generator=torch.Generator().manual_seed(5))
        grads.append(torch.autograd.grad(objective(x0), [x, *denoiser.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_full_backprop_matches_finite_difference(denoiser):
    """The exact gradient, checked against a central finite difference in float64."""
    net = denoiser.double()
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).requires_grad_()
    run = lambda x: objective(sample(lambda x, t, c: net(x, t), DDIM(4), x, gradient_mode=FullBackprop()))
    (grad,) = torch.autograd.grad(run(x), x)
    direction = torch.randn_like(x)
    h = 1e-5
    with torch.no_grad():
        fd = (run(x + h * direction) - run(x - h * direction)) / (2 * h)
    torch.testing.assert_close((grad * direction).sum(), fd, rtol=1e-5, atol=1e-7)


def _count(mode, make_solver, target, denoiser, seed=0):
    denoiser.calls.clear()
    denoiser.entered = 0
    x = torch.randn(1, 1, 8, 8).requires_grad_()
    x0 = sample(lambda x, t, c: denoiser(x, t), make_solver(), x, gradient_mode=mode, target=target,
                generator=torch.Generator().manual_seed(1), plan_generator=torch.Generator().manual_seed(seed))
    objective(x0).backward()
    return denoiser.calls


@pytest.mark.parametrize("name", SOLVERS)
def test_graph_accounting(name, denoiser):
    """The number of network calls holding an autograd graph is what each mode promises."""
    make_solver, _, _ = SOLVERS[name]
    n = make_solver().num_inference_steps
    lat, par = Target.latent(), Target.parameters()
    calls = _count(ShortcutGradient(), make_solver, lat, denoiser)
    assert calls == [True] + [False] * (n - 1)
    calls = _count(ShortcutGradient(), make_solver, par, denoiser)
    assert len(calls) == n and sum(calls) == 1
    calls = _count(ShortcutGradient(num_kept=3), make_solver, par, denoiser)
    assert len(calls) == n and sum(calls) == 3
    for ckpt in (False, True):
        calls = _count(FullBackprop(checkpoint=ckpt), make_solver, lat, denoiser)
        assert calls == [True] * n
        # checkpointing re-enters each call once in backward to recompute its activations
        assert denoiser.entered == (2 * n if ckpt else n)
    for k in (1, 2):
        calls = _count(TruncatedBackprop(k=k), make_solver, par, denoiser)
        assert calls == [False] * (n - k) + [True] * k
    seen_k = set()
    for seed in range(12):
        calls = _count(TruncatedBackprop(random_k=True), make_solver, par, denoiser, seed)
        k = sum(calls)
        assert 1 <= k <= n and calls == [False] * (n - k) + [True] * k
        seen_k.add(k)
    assert len(seen_k) > 1


def test_sdo_parameter_draws_are_uniform_and_cover_every_call(denoiser):
    counts = torch.zeros(N)
    for seed in range(600):
        calls = _count(ShortcutGradient(), lambda: DDIM(N), Target.parameters(), denoiser, seed)
        counts += torch.tensor(calls, dtype=torch.float)
    # 600 draws over 6 calls: each count ~ Binomial(600, 1/6), sd ~ 9.1; 5 sd margin.
    assert (counts - 100).abs().max() < 46


@pytest.mark.parametrize("scale", ["paper", "unbiased"])
@pytest.mark.parametrize("name", ["ddim", "dpm2m", "lcm", "flow"])
def test_sdo_parameter_gradient_expectation_is_eq16(name, scale, denoiser):
    """N times the mean over all N single-call SDO gradients equals Eq. 16, the sum of per-call
    stop-gradient terms, computed here in one pass where every call's input is detached. With
    ``scale: unbiased`` the mean itself equals Eq. 16 (each single-call gradient is N times larger)."""
    make_solver, make_scheduler, _ = SOLVERS[name]
    n = make_solver().num_inference_steps
    params = list(denoiser.parameters())
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    per_call = {}
    for seed in itertools.count():
        denoiser.calls.clear()
        x0 = sample(lambda x, t, c: denoiser(x, t), make_solver(), x, gradient_mode=ShortcutGradient(scale=scale),
                    target=Target.parameters(), generator=torch.Generator().manual_seed(2),
                    plan_generator=torch.Generator().manual_seed(seed))
        kept = denoiser.calls.index(True)
        per_call.setdefault(kept, torch.autograd.grad(objective(x0), params))
        if len(per_call) == n:
            break
    factor = n if scale == "paper" else 1
    sdo_sum = [factor * torch.stack([per_call[i][j] for i in range(n)]).mean(0) for j in range(len(params))]

    scheduler = make_scheduler()
    scheduler.set_timesteps(n)
    gen = torch.Generator().manual_seed(2)
    xi = x
    for t in scheduler.timesteps:
        eps = denoiser(xi.detach(), t)  # sg on the input: only the direct dependence on theta
        xi = scheduler.step(eps, t, xi, generator=gen).prev_sample
    eq16 = torch.autograd.grad(objective(xi), params)
    for a, b in zip(sdo_sum, eq16):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sdo_with_several_kept_calls_is_an_estimator_of_eq16(denoiser):
    """ShortcutGradient(num_kept=2): the mean over every pair of kept calls (all 15 of 6 calls,
    each drawn with equal probability) times N / M equals Eq. 16, computed by a separate loop
    with every call's input detached. Before kept calls read detached inputs, a later kept
    call's graph carried the earlier one's effect (cross terms) and this missed by ~25%."""
    n, m = N, 2
    params = list(denoiser.parameters())
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    per_pair = {}
    for seed in range(2000):
        denoiser.calls.clear()
        x0 = sample(lambda x, t, c: denoiser(x, t), DDIM(n), x, gradient_mode=ShortcutGradient(num_kept=m),
                    target=Target.parameters(), plan_generator=torch.Generator().manual_seed(seed))
        kept = tuple(i for i, graph in enumerate(denoiser.calls) if graph)
        assert len(kept) == m
        per_pair.setdefault(kept, torch.autograd.grad(objective(x0), params))
        if len(per_pair) == 15:
            break
    assert sorted(per_pair) == list(itertools.combinations(range(n), m))
    estimate = [n / m * torch.stack([g[j] for g in per_pair.values()]).mean(0) for j in range(len(params))]

    scheduler = DDIMScheduler(**CONFIG, clip_sample=False)
    scheduler.set_timesteps(n)
    xi = x
    for t in scheduler.timesteps:
        xi = scheduler.step(denoiser(xi.detach(), t), t, xi).prev_sample
    eq16 = torch.autograd.grad(objective(xi), params)
    for a, b in zip(estimate, eq16):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def reference_drtune(scheduler, net, x_start, steps, kept, seed=2):
    """DRTune by hand: kept calls read a detached input, every other call's output is detached."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = x_start
    for i, t in enumerate(scheduler.timesteps):
        eps = net(x.detach(), t) if i in kept else net(x, t).detach()
        x = scheduler.step(eps, t, x, generator=gen).prev_sample
    return x


def _drtune_grad(denoiser, make_solver, x, target, wrt, mode, seed=0):
    denoiser.calls.clear()
    x0 = sample(lambda x, t, c: denoiser(x, t), make_solver(), x, gradient_mode=mode, target=target,
                generator=torch.Generator().manual_seed(2), plan_generator=torch.Generator().manual_seed(seed))
    kept = [i for i, graph in enumerate(denoiser.calls) if graph]
    return torch.autograd.grad(objective(x0), wrt), kept


@pytest.mark.parametrize("name", ["ddim", "dpm2m", "flow"])
def test_drtune_parameter_gradient_equals_reference_loop(name, denoiser):
    """DRTune(k=2) on 6 calls keeps calls 0 and 3 (offset 0) or s and s + 3 (random offset);
    its parameter gradient equals a separate loop over the diffusers scheduler that detaches the
    same calls' inputs and every other call's output."""
    make_solver, make_scheduler, _ = SOLVERS[name]
    params = list(denoiser.parameters())
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for mode, seed in ((DRTune(k=2, random_offset=False), 0), (DRTune(k=2), 5)):
        got, kept = _drtune_grad(denoiser, make_solver, x, Target.parameters(), params, mode, seed)
        if not mode.random_offset:
            assert kept == [0, 3]
        assert len(kept) == 2 and kept[1] - kept[0] == 3
        expected = torch.autograd.grad(objective(reference_drtune(make_scheduler(), denoiser, x, N, kept)), params)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert any(g.abs().sum() > 0 for g in got)


def test_drtune_offsets_cover_every_call_and_average_to_eq16(denoiser):
    """With k=2 of 6 calls the offset takes the values 0, 1, 2; N / K times the mean over the
    three offsets' gradients equals Eq. 16 (every call's input detached, one separate loop)."""
    params = list(denoiser.parameters())
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    by_offset = {}
    for seed in range(200):
        got, kept = _drtune_grad(denoiser, lambda: DDIM(N), x, Target.parameters(), params, DRTune(k=2), seed)
        by_offset.setdefault(kept[0], got)
        if len(by_offset) == 3:
            break
    assert sorted(by_offset) == [0, 1, 2]
    estimate = [N / 2 * torch.stack([g[j] for g in by_offset.values()]).mean(0) for j in range(len(params))]
    eq16 = torch.autograd.grad(objective(reference_drtune(SOLVERS["ddim"][1](), denoiser, x, N, set(range(N)))), params)
    for a, b in zip(estimate, eq16):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["ddim", "dpm2m", "flow"])
def test_drtune_latent_gradient_is_the_skip_path(name, denoiser):
    """For a latent, DRTune's gradient is the solver arithmetic alone: a loop with every network
    output detached gives it; for DDIM it is the closed form prod_i sqrt(abar_prev / abar_t) g,
    and for the Euler flow step it is g itself (g = dJ/dx_0)."""
    make_solver, make_scheduler, _ = SOLVERS[name]
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    (got,), kept = _drtune_grad(denoiser, make_solver, x, Target.latent(), [x], DRTune(k=3))
    assert len(kept) == 3
    (expected,) = torch.autograd.grad(objective(reference_drtune(make_scheduler(), denoiser, x, N, set())), x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        x0 = reference_drtune(make_scheduler(), denoiser, x, N, set())
    x0 = x0.detach().requires_grad_()
    (g,) = torch.autograd.grad(objective(x0), x0)
    if name == "ddim":
        abar = torch.cumprod(1 - torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64), 0)
        ts = [t * (1000 // N) for t in reversed(range(N))]
        prod = 1.0
        for t in ts:
            prev = t - 1000 // N
            prod *= float(torch.sqrt((abar[prev] if prev >= 0 else 1.0) / abar[t]))
        torch.testing.assert_close(got, prod * g, rtol=1e-4, atol=1e-6)
    elif name == "flow":
        torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-7)


def test_drtune_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be >= 1"):
        DRTune(k=0)


def test_truncated_rejects_unreachable_latent():
    with pytest.raises(ValueError, match="no gradient reaches a latent"):
        TruncatedBackprop(k=2).plan(10, Target.latent())


@pytest.mark.parametrize("name", registry.names("gradient_modes"))
@pytest.mark.parametrize("target", [Target.latent(), Target.parameters()], ids=["latent", "parameters"])
def test_every_gradient_mode_plans_a_graph(name, target):
    """Contract test over every registered gradient mode (the gradient-free searches are a kind of
    their own: tests/test_search.py)."""
    mode = registry.classes("gradient_modes")[name]()
    try:
        plan = mode.plan(7, target, torch.Generator().manual_seed(0))
    except ValueError:
        assert target.kind == "latent"  # allowed: a mode that cannot reach a latent says so
        return
    assert len(plan.keep) == 7 and plan.num_kept >= 1
