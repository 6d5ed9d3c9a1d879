"""Helpers and fixtures shared by the test_objectives_paper*.py files (and test_clip_preprocessing.py).

Fixtures are imported by the test modules that use them; a module-scoped one is built once per
importing module.
"""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from sdo_lightning.testing.tiny_models import build_tiny_clip


def rand(*shape, seed=0):
    return torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def check_gradient(fn, x, h=1e-5, seed=1):
    """The autograd directional derivative of ``fn(x).sum()`` equals a central difference."""
    x = x.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    direction = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        fd = (fn(x + h * direction).sum() - fn(x - h * direction).sum()) / (2 * h)
    torch.testing.assert_close((grad * direction).sum(), fd, rtol=1e-4, atol=1e-9)


def check_per_sample(fn, x):
    """Sample i's loss is the loss of sample i alone, and changing sample 1 leaves sample 0's."""
    with torch.no_grad():
        full = fn(x)
        assert full.shape == (len(x),)
        for i in range(len(x)):
            torch.testing.assert_close(full[i:i + 1], fn(x[i:i + 1]), rtol=1e-6, atol=1e-9)
        y = x.clone()
        y[1] = 1 - y[1]
        changed = fn(y)
        torch.testing.assert_close(changed[0], full[0], rtol=1e-6, atol=1e-9)
        assert not torch.isclose(changed[1], full[1])


def assert_one_sentence(excinfo):
    err = excinfo.value
    message = str(err).strip("'\"")  # KeyError reprs its message
    assert "\n" not in message and message.endswith("."), message
    assert re.search(r"\.\s+[A-Z]", message) is None, message
    assert err.__cause__ is None and (err.__suppress_context__ or err.__context__ is None)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def style_png(tmp_path_factory):
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("style") / "style.png"
    Image.fromarray(pixels).save(path)
    return path, torch.from_numpy(pixels).double().permute(2, 0, 1)[None] / 255
