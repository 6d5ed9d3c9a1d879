"""Objectives: per-sample losses, independence, gradients against finite differences."""

import pytest
import torch

from sdo_lightning.objectives import CLIPScore, ClassifierObjective, L2Fidelity, WeightedSum
from sdo_lightning.testing.tiny_models import build_tiny_clip


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


def _fd_check(fn, x, seed=0, h=1e-5, rtol=1e-4):
    """The autograd directional derivative of sum(fn) equals a central difference (float64)."""
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    expected = directional_fd(lambda y: fn(y).sum(), x.detach(), direction, h)
    torch.testing.assert_close((grad * direction).sum(), expected, rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("augment", [0, 4])
def test_classifier_objective_gradient_matches_finite_difference(augment):
    objective = ClassifierObjective(target_class=7, augment=augment, noise_std=0.2).double()
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def fn(y):
        torch.manual_seed(11)  # the same shifted, noised copies in every evaluation
        return objective(y, {})

    _fd_check(fn, x)


def test_fidelity_and_weighted_sum_gradients_match_finite_differences():
    init = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    _fd_check(lambda y: L2Fidelity()(y, {"initial_images": init}), x)
    classifier = ClassifierObjective(target_class=2).double()
    combined = WeightedSum([classifier, L2Fidelity()], [1.0, 0.3])
    x16, init16 = torch.rand(2, 1, 16, 16, dtype=torch.float64), torch.rand(2, 1, 16, 16, dtype=torch.float64)
    _fd_check(lambda y: combined(y, {"initial_images": init16}), x16, seed=1)


def test_l2_fidelity_norm_to_real_images():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    real = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    objective = L2Fidelity(reduction="norm", reference="image")
    expected = torch.stack([torch.sqrt(((x[i] - real[i]) ** 2).sum()) for i in range(2)])
    torch.testing.assert_close(objective(x, {"image": real}), expected)
    _fd_check(lambda y: objective(y, {"image": real}), x, seed=2)
    with pytest.raises(KeyError, match="batch\\['image'\\]"):
        objective(x, {"initial_images": real})
