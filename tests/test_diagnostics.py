"""GradientDiagnostics on the tiny random digits model."""

import pytest
import torch
from lightning.pytorch import Trainer

from sdo_lightning import Objective, sample
from sdo_lightning.backbones import DigitsBackbone
from sdo_lightning.training.data import SampleSet
from sdo_lightning.evaluation.diagnostics import GradientDiagnostics
from sdo_lightning.gradient_modes import FullBackprop, ShortcutGradient
from sdo_lightning.modules.latent_optimization import LatentOptimization
from sdo_lightning.modules.reward_finetuning import RewardFineTuning
from sdo_lightning.solvers import DDIM
from sdo_lightning.modules.targets import StartNoise


class Brightness(Objective, register=False):
    def forward(self, images, batch):
        return images.pow(2).flatten(1).mean(1)


def fit(module, tmp_path, callbacks=(), steps=2, num_samples=2):
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=list(callbacks))
    trainer.fit(module, datamodule=SampleSet(num_samples=num_samples))
    return trainer


def latent_module(tiny_digits_dir, **kw):
    return LatentOptimization(objective=Brightness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(4),
                              lr=0.1, **kw)


def test_cosine_matches_an_independent_computation(tiny_digits_dir, tmp_path):
    diag = GradientDiagnostics(every_n_steps=1, depths=[1, 2, 4, 50])
    module = latent_module(tiny_digits_dir, target=StartNoise(project_to_shell=False))  # diagnosed variable == final one
    own_mode = module.gradient_mode
    trainer = fit(module, tmp_path, [diag])

    backbone = module.backbone
    grads = []
    for mode in (ShortcutGradient(), FullBackprop()):
        x = module.variable.detach().clone().requires_grad_(True)
        x0 = sample(backbone.denoise, DDIM(4), x, module.start_cond, gradient_mode=mode,
                    scheduler_config=backbone.scheduler_config)
        loss = Brightness()(backbone.decode(x0), {}).sum()
        grads.append(torch.autograd.grad(loss, x)[0].flatten())
    sdo, exact = grads
    cosine = torch.nn.functional.cosine_similarity(sdo, exact, dim=0).item()
    assert diag.last["cosine_to_exact"] == pytest.approx(cosine, abs=1e-5)
    assert diag.last["norm_ratio_to_exact"] == pytest.approx((sdo.norm() / exact.norm()).item(), rel=1e-4)
    assert float(trainer.callback_metrics["diagnostics/cosine_to_exact"]) == pytest.approx(cosine, abs=1e-5)
    assert cosine < 1 - 1e-4  # SDO is not the exact gradient here: the test can tell them apart
    # depth 1 is SDO, depth N = 4 is exact; depth 50 > N is skipped
    assert diag.last["grad_norm_depth_1"] == pytest.approx(sdo.norm().item(), rel=1e-4)
    assert diag.last["grad_norm_depth_4"] == pytest.approx(exact.norm().item(), rel=1e-4)
    assert "grad_norm_depth_2" in diag.last and "grad_norm_depth_50" not in diag.last
    assert module.gradient_mode is own_mode  # restored


def test_full_backprop_is_exact(tiny_digits_dir, tmp_path):
    diag = GradientDiagnostics(every_n_steps=1, depths=[])
    fit(latent_module(tiny_digits_dir, gradient_mode=FullBackprop()), tmp_path, [diag])
    assert diag.last["cosine_to_exact"] == pytest.approx(1.0, abs=1e-5)
    assert diag.last["norm_ratio_to_exact"] == pytest.approx(1.0, abs=1e-5)


def test_callback_leaves_training_unchanged(tiny_digits_dir, tmp_path):
    finals = []
    for callbacks in ((), (GradientDiagnostics(every_n_steps=1),)):
        module = latent_module(tiny_digits_dir)
        fit(module, tmp_path, callbacks, steps=3)
        finals.append(module.variable.detach().clone())
    torch.testing.assert_close(finals[0], finals[1], rtol=0, atol=0)


def test_reward_finetuning_runs_and_is_unchanged(tiny_digits_dir, tmp_path):
    adapters, diags = [], []
    for callbacks in ((), (GradientDiagnostics(every_n_steps=1, depths=[1, 2, 4]),)):
        torch.manual_seed(0)
        module = RewardFineTuning(objective=Brightness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(4),
                                  lr=0.05)  # SDO on parameters: random kept call from the plan generator
        fit(module, tmp_path, callbacks, steps=3, num_samples=3)
        adapters.append([p.detach().clone() for p in module.lora_params])
        diags.extend(callbacks)
    for a, b in zip(*adapters):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    last = diags[0].last
    assert -1 <= last["cosine_to_exact"] <= 1 and last["norm_ratio_to_exact"] > 0
    assert last["grad_norm_depth_4"] == pytest.approx(last["exact_grad_norm"])
    assert {"grad_norm_depth_1", "grad_norm_depth_2", "seconds"} <= set(last)


def test_picard_estimate_matches_closed_form_for_a_linear_network():
    """eps = c * x makes DDIM x_{k+1} = m_k x_k. From a guess that is the trajectory of another
    start y, one sweep from x_N gives x^1_k - x*_k = (1 - P_k)(x_N - y) while
    guess_k - x*_k = P_k (y - x_N), with P_k = m_0 ... m_{k-1}; so
    lambda = sqrt(sum (1 - P_k)^2) / sqrt(sum P_k^2)."""
    import math

    from sdo_lightning.evaluation.diagnostics import picard_contraction, trajectory
    from sdo_lightning.solvers import DDIM as _DDIM

    c, steps = 0.3, 10
    net = lambda x, t, cond: c * x
    solver = _DDIM(steps)
    config = {"num_train_timesteps": 1000}
    x_n = torch.full((1, 1, 2, 2), 1.5, dtype=torch.float64)
    y = torch.full((1, 1, 2, 2), -0.5, dtype=torch.float64)
    guess = trajectory(net, solver, y, None, config)
    lam, fixed = picard_contraction(net, solver, x_n, None, guess, config)

    betas = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    ts = [k * (1000 // steps) for k in reversed(range(steps))]
    p, products = 1.0, []
    for t in ts:
        prev = t - 1000 // steps
        a_t, a_p = abar[t].item(), (abar[prev].item() if prev >= 0 else 1.0)
        m = math.sqrt(a_p / a_t) + c * (math.sqrt(1 - a_p) - math.sqrt(a_p * (1 - a_t) / a_t))
        p *= m
        products.append(p)
    expected = math.sqrt(sum((1 - q) ** 2 for q in products)) / math.sqrt(sum(q * q for q in products))
    assert lam == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(fixed[-1], x_n * products[-1])


def test_picard_lambda_is_logged_from_the_second_diagnosis(tiny_digits_dir, tmp_path):
    callback = GradientDiagnostics(every_n_steps=1, depths=[])
    module = LatentOptimization(objective=Brightness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(4), lr=0.2)
    Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            callbacks=[callback], default_root_dir=tmp_path).fit(module, datamodule=SampleSet(num_samples=2))
    assert 0 <= callback.last["picard_lambda"] < 10
