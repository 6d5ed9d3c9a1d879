"""SearchThenGradient (a search, then gradient steps from its best) and StartNoise(white_noise)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from lightning.pytorch import Trainer

from sdo_lightning import Objective
from sdo_lightning.backbones import DigitsBackbone
from sdo_lightning.gradient_modes import ShortcutGradient
from sdo_lightning.modules.latent_optimization import LatentOptimization
from sdo_lightning.modules.reward_finetuning import RewardFineTuning
from sdo_lightning.modules.targets import StartNoise
from sdo_lightning.objectives import ClassifierObjective
from sdo_lightning.searches import BestOfN, SearchThenGradient
from sdo_lightning.solvers import DDIM
from sdo_lightning.training.data import SampleSet

N = 4  # DDIM steps


class Brightness(Objective, register=False):
    """Per-sample weighted mean brightness: a smooth objective with a gradient everywhere."""

    def __init__(self, weights):
        super().__init__()
        self.w = torch.tensor(weights)

    def forward(self, images, batch):
        return self.w[batch["index"]] * images.flatten(1).mean(1)


def fit(module, tmp_path, steps, samples=2):
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=SampleSet(num_samples=samples))
    return trainer


def module(tiny_digits_dir, gradient_mode, **kw):
    return LatentOptimization(objective=Brightness([1.0, -2.0]), backbone=DigitsBackbone(tiny_digits_dir),
                              solver=DDIM(N), gradient_mode=gradient_mode, lr=0.05, **kw)


def hand_sdo_adam(tiny_digits_dir, x, steps, lr, weights, shell):
    """SDO on x_T written out: a diffusers DDIM loop where only the first UNet call keeps its graph,
    the straight-through clamp of the digits decoder, the summed brightness loss, a fresh Adam,
    and after each step the rescale to each sample's shell norm."""
    unet = UNet2DModel.from_pretrained(tiny_digits_dir / "unet")
    scheduler = DDIMScheduler.from_pretrained(tiny_digits_dir / "scheduler", clip_sample=False)
    labels = torch.full((len(x),), 10)
    x = torch.nn.Parameter(x.clone())
    adam = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        scheduler.set_timesteps(N)
        z = x
        for i, t in enumerate(scheduler.timesteps):
            with torch.set_grad_enabled(i == 0):
                eps = unet(z, t, class_labels=labels).sample
            z = scheduler.step(eps, t, z).prev_sample
        images = (z + 1) / 2
        images = images + (images.clamp(0, 1) - images).detach()
        loss = (torch.tensor(weights) * images.flatten(1).mean(1)).sum()
        adam.zero_grad()
        loss.backward()
        adam.step()
        with torch.no_grad():
            x.mul_((shell / x.flatten(1).norm(dim=1)).view(-1, 1, 1, 1))
    return x.detach()


def test_the_search_steps_then_sdo_steps_from_the_best_candidate(tiny_digits_dir, tmp_path):
    """4 steps at split 0.5: the variable after them equals best-of-N's after 2 steps, followed by a
    hand-written SDO + Adam loop of 2 steps started from it (a fresh optimizer state)."""
    hybrid = module(tiny_digits_dir, SearchThenGradient(BestOfN(candidates=3), ShortcutGradient(), split=0.5))
    fit(hybrid, tmp_path, steps=4)
    search = module(tiny_digits_dir, BestOfN(candidates=3))
    fit(search, tmp_path, steps=2)
    assert not torch.equal(search.variable, search.start_latent)  # the search moved some sample
    shell = search.start_latent.flatten(1).norm(dim=1)
    want = hand_sdo_adam(tiny_digits_dir, search.variable.detach(), steps=2, lr=0.05, weights=[1.0, -2.0], shell=shell)
    torch.testing.assert_close(hybrid.variable.detach(), want, rtol=1e-5, atol=1e-6)
    # the best images are the lowest loss seen over both phases
    torch.testing.assert_close(hybrid.best_loss, torch.minimum(search.best_loss, hybrid.best_loss))
    assert bool((hybrid.best_loss <= search.best_loss + 1e-7).all())


@pytest.mark.parametrize("split,steps,searched", [(0.5, 4, 2), (0.25, 8, 2), (0.1, 3, 1), (0.9, 3, 2)])
def test_the_split_counts_search_steps_and_leaves_one_of_each_at_least(split, steps, searched):
    assert SearchThenGradient(split=split).search_steps(steps) == searched


@pytest.mark.parametrize("split", [0.0, 1.0, -0.5, 1.5])
def test_a_split_outside_zero_one_is_one_sentence(split):
    with pytest.raises(ValueError, match=r"split must lie in \(0, 1\)"):
        SearchThenGradient(split=split)


def test_bad_compositions_are_refused_before_sampling(tiny_digits_dir, tmp_path):
    with pytest.raises(ValueError, match="must be a plain search"):
        SearchThenGradient(search=SearchThenGradient())
    with pytest.raises(ValueError, match="must be a gradient mode"):
        SearchThenGradient(gradient_mode=BestOfN())
    with pytest.raises(ValueError, match="searches without gradients"):
        RewardFineTuning(ClassifierObjective(str(tiny_digits_dir / "classifier"), 7), DigitsBackbone(tiny_digits_dir),
                         DDIM(N), gradient_mode=SearchThenGradient())
    with pytest.raises(ValueError, match="set trainer.max_steps to 2 or more"):
        fit(module(tiny_digits_dir, SearchThenGradient()), tmp_path, steps=1)


def _rings(h, w):
    fy = np.fft.fftfreq(h, 1 / h)[:, None]
    fx = np.fft.fftfreq(w, 1 / w)[None, :]
    return np.floor(np.hypot(fy, fx) + 0.5).astype(int)


def test_white_noise_start_noise_keeps_white_statistics_on_the_shell(tiny_digits_dir, tmp_path):
    target = StartNoise(white_noise=True)
    m = module(tiny_digits_dir, ShortcutGradient(), target=target)
    fit(m, tmp_path, steps=2)
    x = m.variable.detach().double().numpy()
    start = m.start_latent.double().numpy()
    np.testing.assert_allclose(np.linalg.norm(x.reshape(2, -1), axis=1), np.linalg.norm(start.reshape(2, -1), axis=1),
                               rtol=1e-5)
    _, c, h, w = x.shape
    rings = _rings(h, w)
    for s in range(2):
        for ch in range(c):
            img = x[s, ch]
            assert abs(img.mean()) < 1e-5
            power = np.abs(np.fft.fft2(img)) ** 2
            means = np.array([power[rings == r].mean() for r in range(1, rings.max() + 1)])
            np.testing.assert_allclose(means / means.mean(), 1.0, rtol=1e-4)
    assert not np.allclose(x, start)  # it moved


def test_white_noise_and_a_perturbation_bound_are_one_or_the_other():
    with pytest.raises(ValueError, match="set one of them"):
        StartNoise(white_noise=True, linf_radius=0.1)
