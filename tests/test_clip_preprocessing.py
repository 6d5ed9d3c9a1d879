"""CLIPScore preprocesses like transformers' CLIPImageProcessor, on a real photo, differentiably.

The photo is scikit-learn's ``china.jpg`` (427 x 640 RGB). CLIPImageProcessor (its PIL backend
when torchvision is not installed) resizes the uint8 image with PIL's bicubic filter, rounds the
result to uint8, center-crops and normalizes; CLIPScore does the same steps with torch ops on
floats in [0, 1]. What separates the two, in normalized pixel values:

- the 8-bit rounding: at most 0.5/255/std (0.0073 for CLIP's std, 0.0098 for std 0.2), about a
  quarter of that on average (0.0037 for CLIP's std): it makes up nearly all of the measured
  mean difference (0.0041 at 224 pixels, 0.0041 at 32);
- the bicubic kernels: PIL's has a = -0.5, torch's a = -0.75, so sharp edges differ by a few
  8-bit levels: measured max 0.059 at 224 pixels (about 4/255 before normalization), 0.013 at 32.

The bounds below (mean < 0.01, 99th percentile < 0.03, max < 0.25) leave room for other PIL
builds while the old preprocessing (a plain, non-antialiased bicubic resize of the whole image to
a square, CLIP's statistics always) measured mean 0.54 and max 3.5 against the same processor,
and a resize that rounds the long side instead of flooring it (336 instead of 335 columns: the
crop moves by half a pixel) measured mean 0.095 and max 1.8.
"""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from objective_fixtures import assert_one_sentence, check_gradient, rand
from sdo_lightning.objectives import CLIPScore
from sdo_lightning.objectives._inputs import normalize
from sdo_lightning.objectives.clip import CLIP_MEAN, CLIP_STD, clip_preprocessing
from sdo_lightning.testing.tiny_models import build_tiny_clip

MEAN_BOUND, P99_BOUND, MAX_BOUND = 0.01, 0.03, 0.25
TINY_PROCESSOR = dict(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                      image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])


def processor(**kwargs):
    from transformers import CLIPImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CLIPImageProcessor(**kwargs)


def processed(proc, photo):
    return torch.from_numpy(proc(images=photo, return_tensors="np")["pixel_values"]).double()


def differences(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    d = (a - b).abs().flatten()
    return d.mean().item(), d.quantile(0.99).item(), d.max().item()


def assert_close_to_processor(ours, reference):
    mean, p99, top = differences(ours, reference)
    assert mean < MEAN_BOUND and p99 < P99_BOUND and top < MAX_BOUND, (mean, p99, top)


def old_preprocess(x, size):
    """CLIPScore's preprocessing before: the whole image to a square, bicubic without antialiasing."""
    return normalize(F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False), CLIP_MEAN, CLIP_STD)


@pytest.fixture(scope="module")
def photo():
    from sklearn.datasets import load_sample_image

    image = load_sample_image("china.jpg")
    assert image.shape == (427, 640, 3) and image.dtype == np.uint8
    return image


@pytest.fixture(scope="module")
def photo_tensor(photo):
    return torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].double() / 255


@pytest.fixture(scope="module")
def clip224(tmp_path_factory):
    """A tiny CLIPModel at CLIP's input size, 224 (7 x 7 patches of 32), without a processor config."""
    return build_tiny_clip(tmp_path_factory.mktemp("clip224"), vision_layers=1, text_layers=1, image_size=224,
                           patch_size=32)


@pytest.fixture(scope="module")
def tiny_with_processor(tmp_path_factory):
    """The tiny CLIP (input 32) with a saved processor: short side 40, crop 32, its own mean/std."""
    root = build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_processor"))
    processor(**TINY_PROCESSOR).save_pretrained(root)
    return root


def test_default_preprocessing_matches_clip_image_processor(clip224, photo, photo_tensor):
    objective = CLIPScore(str(clip224)).double()
    assert not (clip224 / "preprocessor_config.json").exists()  # CLIP's published defaults
    reference = processed(processor(), photo)  # shortest edge 224, crop 224 x 224, CLIP mean/std
    ours = objective.preprocess(photo_tensor)
    assert_close_to_processor(ours, reference)
    old_mean, _, old_max = differences(old_preprocess(photo_tensor, 224), reference)
    assert old_mean > 30 * MEAN_BOUND and old_max > 8 * MAX_BOUND, (old_mean, old_max)
    # rounding the long side (336 columns) instead of flooring it (335) moves the crop by half a pixel
    rounded = F.interpolate(photo_tensor, size=(224, 336), mode="bicubic", align_corners=False, antialias=True)
    round_mean, _, round_max = differences(normalize(rounded[..., 56:280], CLIP_MEAN, CLIP_STD), reference)
    assert round_mean > 5 * MEAN_BOUND and round_max > 4 * MAX_BOUND, (round_mean, round_max)
    loss = objective(photo_tensor, {"prompt": "a temple"})
    assert loss.shape == (1,) and torch.isfinite(loss).all()


@pytest.mark.parametrize("resample", [3, 2])  # PIL bicubic, bilinear
def test_saved_processor_config_is_followed(tmp_path, photo, photo_tensor, resample):
    root = build_tiny_clip(tmp_path / "clip")
    processor(**TINY_PROCESSOR, resample=resample).save_pretrained(root)
    from transformers import CLIPImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = processed(CLIPImageProcessor.from_pretrained(root), photo)
    objective = CLIPScore(str(root)).double()
    assert objective.interpolation == ("bicubic" if resample == 3 else "bilinear")
    ours = objective.preprocess(photo_tensor)
    assert_close_to_processor(ours, reference)
    old_mean, _, old_max = differences(old_preprocess(photo_tensor, 32), reference)
    assert old_mean > 30 * MEAN_BOUND and old_max > 8 * MAX_BOUND, (old_mean, old_max)


def test_legacy_int_sizes_read_like_the_dict_ones(tmp_path, tiny_with_processor, photo_tensor):
    """Older configs (openai/clip-vit-*'s) write ``size: 224, crop_size: 224``: the int size is the short side."""
    root = build_tiny_clip(tmp_path / "legacy")
    (root / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.25, 0.3], "resample": 3, "size": 40}))
    assert clip_preprocessing(str(root), 32) == clip_preprocessing(str(tiny_with_processor), 32) == {
        "crop": 32, "resize": 40, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "interpolation": "bicubic"}
    legacy = CLIPScore(str(root)).double().preprocess(photo_tensor)
    torch.testing.assert_close(legacy, CLIPScore(str(tiny_with_processor)).double().preprocess(photo_tensor),
                               rtol=0, atol=0)


def test_processor_config_errors_are_one_sentence(tmp_path):
    root = build_tiny_clip(tmp_path / "clip")
    processor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}).save_pretrained(root)
    with pytest.raises(ValueError, match="crops 24 x 24 pixels but its vision tower takes 32 x 32; fix crop_size") as e:
        CLIPScore(str(root))
    assert_one_sentence(e)
    (root / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json of .* is not readable") as e:
        CLIPScore(str(root))
    assert_one_sentence(e)
    (root / "preprocessor_config.json").write_text(json.dumps({"size": {"longest_edge": 40}}))
    with pytest.raises(ValueError, match="has size .*longest_edge.*CLIPScore reads an int") as e:
        CLIPScore(str(root))
    assert_one_sentence(e)


@pytest.mark.parametrize("shape", [(2, 3, 48, 64), (2, 1, 20, 28)])  # antialiased downscale; grayscale upscale
def test_gradient_through_resize_and_crop_matches_finite_difference(tiny_with_processor, shape):
    objective = CLIPScore(str(tiny_with_processor), prompt="a red cat").double()
    x = rand(*shape, seed=3)
    assert objective.preprocess(x).shape == (2, 3, 32, 32)
    check_gradient(lambda y: objective(y, {}), x)
