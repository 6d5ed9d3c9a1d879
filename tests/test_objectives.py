"""Objectives: per-sample losses, independence, gradients against finite differences."""

import pytest
import torch

from sdo_lightning.contracts import REGISTRY
from sdo_lightning.objectives import CLIPScore, ClassifierObjective, L2Fidelity, WeightedSum
from tiny_models import build_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def directional_fd(fn, x, direction, h=1e-5):
    with torch.no_grad():
        return (fn(x + h * direction) - fn(x - h * direction)) / (2 * h)


def test_clip_score_gradient_matches_finite_difference(tiny_clip):
    objective = CLIPScore(str(tiny_clip), prompt="a red cat").double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss = objective(x, {})
    assert loss.shape == (2,)
    # the logged score is the cosine of the normalized embeddings
    torch.testing.assert_close(objective.terms["clip_score"], 1 - loss.detach())
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    direction = torch.randn_like(x)
    fd = directional_fd(lambda y: objective(y, {}).sum(), x.detach(), direction)
    torch.testing.assert_close((grad * direction).sum(), fd, rtol=1e-4, atol=1e-8)


def test_clip_score_is_per_sample_and_reads_batch_prompts(tiny_clip):
    objective = CLIPScore(str(tiny_clip))
    x = torch.rand(3, 1, 16, 16)
    both = objective(x, {"prompt": ["a cat", "a dog", "a cat"]})
    alone = objective(x[1:2], {"prompt": ["a dog"]})
    torch.testing.assert_close(both[1:2], alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="prompt"):
        objective(x, {})


def test_missing_clip_model_is_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="could not load a CLIP model"):
        CLIPScore(str(tmp_path / "nowhere"), local_files_only=True)


def test_weighted_sum_is_the_weighted_sum():
    a, b = L2Fidelity(), L2Fidelity()
    x, init = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    total = WeightedSum([a, b], [0.5, 2.0])(x, {"initial_images": init})
    mse = (x - init).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(total, 2.5 * mse)


def test_untargeted_classifier_moves_away_from_the_source_class():
    objective = ClassifierObjective(untargeted=True)
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        source = objective.classifier(x).argmax(-1)
        log_p = objective.classifier(x).log_softmax(-1).gather(1, source[:, None])[:, 0]
    torch.testing.assert_close(objective(x, {"initial_images": x}), log_p)


@pytest.mark.parametrize("name", ["ClassifierObjective", "L2Fidelity"])
def test_registered_objectives_return_one_loss_per_sample(name):
    objective = REGISTRY["objectives"][name](**({"target_class": 3} if name == "ClassifierObjective" else {}))
    x = torch.rand(3, 1, 16, 16, requires_grad=True)
    loss = objective(x, {"initial_images": torch.rand(3, 1, 16, 16)})
    assert loss.shape == (3,)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(grad).all()
