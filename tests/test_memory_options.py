"""Checkpointing at the decode and reward boundary: every option gives the gradient without it.

Options: the kept network call (``ShortcutGradient(checkpoint=True)``), the VAE decode (the
latent backbones' ``checkpoint_decode``) and the objective's network (``Checkpointed``). The
reference is the same computation with no checkpointing; each option must also really recompute
(its network runs once more, in backward).
"""

import pytest
import torch

from sdo_lightning import sample
from sdo_lightning.backbones import StableDiffusionBackbone
from sdo_lightning.gradient_modes import ShortcutGradient
from sdo_lightning.objectives import ClassifierObjective, CLIPScore, WeightedSum
from sdo_lightning.objectives.checkpointed import Checkpointed
from sdo_lightning.solvers import DDIM

from sdo_lightning.testing.tiny_models import build_tiny_clip, build_tiny_sd

PROMPTS = ["a cat", "a red dog"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory_options")
    build_tiny_sd(root / "sd")
    build_tiny_clip(root / "clip")
    return root


@pytest.fixture(scope="module")
def parts(root):
    backbone = StableDiffusionBackbone(str(root / "sd"), guidance_scale=2.0)
    objective = WeightedSum([CLIPScore(str(root / "clip"), prompt="a cat")])
    return backbone, objective


class Count:
    """Forward passes of a module (checkpointing's recomputations included)."""

    def __init__(self, module):
        self.n = 0
        # entries, not exits: checkpointing stops a recomputation once it has what backward needs
        module.register_forward_pre_hook(lambda *args: setattr(self, "n", self.n + 1))


def sdo_step(backbone, objective, kept_checkpoint=False):
    x = torch.randn(2, *backbone.latent_shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    cond = backbone.encode_condition({"prompt": PROMPTS})
    x0 = sample(backbone.denoise, DDIM(3), x, cond, gradient_mode=ShortcutGradient(checkpoint=kept_checkpoint),
                scheduler_config=backbone.scheduler_config)
    losses = objective(backbone.decode(x0), {"prompt": PROMPTS, "index": torch.arange(2)})
    (grad,) = torch.autograd.grad(losses.sum(), x)
    return losses.detach(), dict(objective.terms), grad


@pytest.fixture(scope="module")
def counters(parts):
    backbone, objective = parts
    return {"unet": Count(backbone.unet), "decoder": Count(backbone.vae.decoder),
            "clip": Count(objective.objectives[0].clip.vision_model)}


@pytest.fixture(scope="module")
def reference(parts, counters):
    before = {k: c.n for k, c in counters.items()}
    out = sdo_step(*parts)
    assert {k: c.n - before[k] for k, c in counters.items()} == {"unet": 3, "decoder": 1, "clip": 1}
    return out


@pytest.mark.parametrize("option,recomputed", [("kept_call", "unet"), ("decode", "decoder"), ("objective", "clip")])
def test_each_checkpointing_option_gives_the_same_gradient(option, recomputed, parts, counters, reference):
    backbone, objective = parts
    before = {k: c.n for k, c in counters.items()}
    try:
        backbone.checkpoint_decode = option == "decode"
        wrapped = Checkpointed(objective) if option == "objective" else objective
        losses, terms, grad = sdo_step(backbone, wrapped, kept_checkpoint=option == "kept_call")
    finally:
        backbone.checkpoint_decode = False
    calls = {k: c.n - before[k] for k, c in counters.items()}
    expected = {"unet": 3, "decoder": 1, "clip": 1}
    expected[recomputed] += 1  # the checkpointed network ran again in backward
    assert calls == expected
    want_losses, want_terms, want_grad = reference
    torch.testing.assert_close(losses, want_losses, rtol=0, atol=0)
    assert terms.keys() == want_terms.keys()
    for key in terms:
        torch.testing.assert_close(terms[key], want_terms[key], rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_checkpoint_decode_is_an_option_of_every_latent_family(root):
    import inspect

    from sdo_lightning.backbones import (FluxBackbone, PixArtAlphaBackbone, StableDiffusion3Backbone,
                                         StableDiffusionXLBackbone)
    from diffusers import StableDiffusionPipeline

    for cls in (StableDiffusionBackbone, StableDiffusionXLBackbone, StableDiffusion3Backbone, FluxBackbone,
                PixArtAlphaBackbone):
        assert inspect.signature(cls.__init__).parameters["checkpoint_decode"].default is False
    pipe = StableDiffusionPipeline.from_pretrained(str(root / "sd"))
    assert StableDiffusionBackbone.from_pipeline(pipe, checkpoint_decode=True).checkpoint_decode
    assert not StableDiffusionBackbone.from_pipeline(pipe).checkpoint_decode
    assert StableDiffusionBackbone(str(root / "sd"), local_files_only=True, checkpoint_decode=True).checkpoint_decode


def test_checkpointed_objective_replays_the_augmentation_draws(tiny_digits_dir):
    """An augmenting objective draws shifts and noise: the recomputation in backward must draw the
    same ones, or the gradient belongs to other copies than the loss."""
    inner = ClassifierObjective(path=str(tiny_digits_dir / "classifier"), target_class=3, augment=4, noise_std=0.3)
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def loss_and_grad(objective):
        x = images.clone().requires_grad_()
        torch.manual_seed(5)
        losses = objective(x, {})
        (grad,) = torch.autograd.grad(losses.sum(), x)
        return losses.detach(), grad

    want = loss_and_grad(inner)
    got = loss_and_grad(Checkpointed(inner))
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-8)
    with torch.no_grad():  # no graph, no checkpoint: the plain objective's loss
        torch.manual_seed(5)
        torch.testing.assert_close(Checkpointed(inner)(images, {}), want[0], rtol=0, atol=0)
