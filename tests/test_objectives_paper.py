"""The paper's objectives on tiny models: LPIPS, the YAML snippets of all of them, their registration.

The CLIP-based objectives (style loss, aesthetic score) are tested in
test_objectives_paper_clip.py, the ImageNet classifier and HPSv2 in
test_objectives_paper_classifier_hps.py. Every objective is loaded through the file /
from_pretrained path users take; every value is checked against a reference written here with
plain torch ops from the saved tensors; every gradient against a float64 central finite
difference; every loss for per-sample independence. torchvision, timm and open_clip are not
installed here: fake modules stand in for them (see tiny_objective_models.py), so their real
APIs are not exercised by these tests.
"""

from importlib import metadata

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from objective_fixtures import assert_one_sentence, check_gradient, check_per_sample, rand, style_png, tiny_clip  # noqa: F401
from sdo_lightning import registry
from sdo_lightning.objectives import CLIPScore, LPIPSFidelity, WeightedSum
from sdo_lightning.testing.tiny_objective_models import (
    VGG16_BLOCKS,
    TinyOpenCLIP,
    aesthetic_state,
    install_fake_open_clip,
    install_fake_torchvision,
    lpips_lin_state,
    save,
    vgg16_state,
)

# -- LPIPS --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lpips")
    return save(vgg16_state(), root / "vgg16-397923af.pth"), save(lpips_lin_state(), root / "weights/v0.1/vgg.pth")


def lpips_reference(x, y, vgg, lin):
    """LPIPS from its definition, with functional ops on the saved tensors."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def taps(img):
        h, out = ((2 * img - 1) - shift) / scale, []
        for b, block in enumerate(VGG16_BLOCKS):
            if b:
                h = F.max_pool2d(h, 2)
            for i in block:
                h = F.relu(F.conv2d(h, vgg[f"features.{i}.weight"].double(), vgg[f"features.{i}.bias"].double(), padding=1))
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = 0
    for l, (a, b) in enumerate(zip(taps(x), taps(y))):
        w = lin[f"lin{l}.model.1.weight"].double()
        total = total + F.conv2d((a - b) ** 2, w).mean((1, 2, 3))
    return total


def test_lpips_matches_the_formula_on_the_saved_weights(lpips_files):
    objective = LPIPSFidelity(*map(str, lpips_files)).double()
    x, init = rand(3, 3, 16, 16, seed=0), rand(3, 3, 16, 16, seed=1)
    loss = objective(x, {"initial_images": init})
    expected = lpips_reference(x, init, vgg16_state(), lpips_lin_state())
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(objective.terms["lpips"], expected)
    assert (expected > 0).all()
    torch.testing.assert_close(objective(init, {"initial_images": init}), torch.zeros(3, dtype=torch.float64))


def test_lpips_grayscale_and_resize(lpips_files):
    objective = LPIPSFidelity(*map(str, lpips_files), size=24).double()
    x, init = rand(2, 1, 12, 12, seed=2), rand(2, 1, 12, 12, seed=3)
    up = lambda t: F.interpolate(t.expand(-1, 3, -1, -1), size=(24, 24), mode="bilinear", align_corners=False)  # noqa: E731
    expected = lpips_reference(up(x), up(init), vgg16_state(), lpips_lin_state())
    torch.testing.assert_close(objective(x, {"initial_images": init}), expected, rtol=1e-10, atol=0)


def test_lpips_gradient_and_independence(lpips_files):
    objective = LPIPSFidelity(*map(str, lpips_files)).double()
    init = rand(3, 3, 16, 16, seed=1)
    check_gradient(lambda x: objective(x, {"initial_images": init[:2]}), rand(2, 3, 16, 16, seed=4))
    # the reference image of sample i is initial_images[i]: slice both together
    full = objective(rand(3, 3, 16, 16, seed=5), {"initial_images": init})
    for i in range(3):
        alone = objective(rand(3, 3, 16, 16, seed=5)[i:i + 1], {"initial_images": init[i:i + 1]})
        torch.testing.assert_close(full[i:i + 1], alone, rtol=1e-10, atol=1e-12)
    check_per_sample(lambda x: objective(x, {"initial_images": init[:1]}), rand(3, 3, 16, 16, seed=6))


@pytest.mark.parametrize("suffix", [".png", ".npz"])
def test_lpips_to_a_reference_file(lpips_files, tmp_path, suffix):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path = tmp_path / f"ref{suffix}"
    Image.fromarray(pixels).save(path) if suffix == ".png" else np.savez(path, image=pixels)
    objective = LPIPSFidelity(*map(str, lpips_files), reference=str(path)).double()
    x = rand(2, 3, 16, 16, seed=7)
    ref = torch.from_numpy(pixels).double().permute(2, 0, 1)[None] / 255
    expected = lpips_reference(x, ref.expand(2, -1, -1, -1), vgg16_state(), lpips_lin_state())
    torch.testing.assert_close(objective(x, {}), expected, rtol=1e-6, atol=0)


def test_lpips_errors_are_one_sentence(lpips_files, tmp_path):
    vgg, lin = map(str, lpips_files)
    with pytest.raises(FileNotFoundError, match=r"VGG16 weights file .*nowhere.pth' not found; download .*vgg16-397923af") as e:
        LPIPSFidelity(str(tmp_path / "nowhere.pth"), lin)
    assert_one_sentence(e)
    with pytest.raises(FileNotFoundError, match=r"LPIPS weights file .* not found; download .*v0.1/vgg.pth") as e:
        LPIPSFidelity(vgg, str(tmp_path / "nowhere.pth"))
    assert_one_sentence(e)
    narrow = save(lpips_lin_state(widths=(4, 6, 8, 8, 5)), tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match=r"lin4.model.1.weight.*needs \(1, 8, 1, 1\)") as e:
        LPIPSFidelity(vgg, str(narrow))
    assert_one_sentence(e)
    not_vgg = save({"conv.weight": torch.zeros(1)}, tmp_path / "not_vgg.pth")
    with pytest.raises(ValueError, match=r"features.0.weight") as e:
        LPIPSFidelity(str(not_vgg), lin)
    assert_one_sentence(e)
    (tmp_path / "page.pth").write_text("<html>404</html>")
    with pytest.raises(ValueError, match="not a readable weights file") as e:
        LPIPSFidelity(str(tmp_path / "page.pth"), lin)
    assert_one_sentence(e)
    with pytest.raises(ValueError, match="at least 16 x 16 pixels") as e:
        LPIPSFidelity(vgg, lin)(torch.rand(1, 3, 8, 8), {"initial_images": torch.rand(1, 3, 8, 8)})
    assert_one_sentence(e)


def test_clip_with_lpips_fidelity_is_the_papers_weighted_sum(tiny_clip, lpips_files):
    """Eq. 23: lambda * CLIP + (1 - lambda) * fidelity, each term logged."""
    clip, lpips = CLIPScore(str(tiny_clip), prompt="a smiling face"), LPIPSFidelity(*map(str, lpips_files))
    x, init = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    batch = {"initial_images": init}
    total = WeightedSum([clip, lpips], [0.7, 0.3])(x, batch)
    torch.testing.assert_close(total, 0.7 * clip(x, batch) + 0.3 * lpips(x, batch))


# -- from YAML --------------------------------------------------------------------------------------

CONFIG = """
trainer: {{max_steps: 1, accelerator: cpu}}
model:
  class_path: LatentOptimization
  init_args:
    objective:
{objective}
    solver: {{class_path: DDIM, init_args: {{num_inference_steps: 2}}}}
data: {{class_path: SampleSet, init_args: {{num_samples: 2, target: 7}}}}
"""

# The snippets of the report / README, with the tiny files' paths filled in.
SNIPPETS = {
    "clip+lpips": """
      class_path: WeightedSum
      init_args:
        objectives:
          - class_path: CLIPScore
            init_args: {{model: {clip}, prompt: a smiling face}}
          - class_path: LPIPSFidelity
            init_args: {{vgg_weights: {vgg}, lpips_weights: {lin}, size: 64}}
        weights: [0.7, 0.3]""",
    "style": """
      class_path: CLIPStyleLoss
      init_args: {{model: {clip}, reference: {png}, layer: 2}}""",
    "aesthetic": """
      class_path: AestheticScore
      init_args: {{mlp: {mlp}, model: {clip}, target: 10.0}}""",
    "classifier": """
      class_path: ImageClassifierObjective
      init_args: {{model: torchvision/tinynet, weights: IMAGENET1K_V1, untargeted: true}}""",
    "hps": """
      class_path: HPSv2Score
      init_args: {{checkpoint: {hps}, prompt: a painting of a cat}}""",
}


@pytest.mark.parametrize("snippet", list(SNIPPETS))
def test_yaml_snippets_instantiate(snippet, tiny_weights, tiny_clip, lpips_files, style_png, tmp_path, monkeypatch):
    from sdo_lightning.cli import main

    install_fake_torchvision(monkeypatch)
    install_fake_open_clip(monkeypatch)
    files = {
        "clip": tiny_clip, "vgg": lpips_files[0], "lin": lpips_files[1], "png": style_png[0],
        "mlp": save(aesthetic_state("improved", dim=8), tmp_path / "mlp.pth"),
        "hps": save({"state_dict": TinyOpenCLIP().state_dict()}, tmp_path / "HPS_v2_compressed.pt"),
    }
    (tmp_path / "config.yaml").write_text(CONFIG.format(objective=SNIPPETS[snippet].format(**files)))
    monkeypatch.chdir(tmp_path)
    cli = main(["--config", str(tmp_path / "config.yaml"), "--trainer.logger", "false"], run=False)
    objective = cli.model.objective
    expected = {"clip+lpips": "WeightedSum", "style": "CLIPStyleLoss", "aesthetic": "AestheticScore",
                "classifier": "ImageClassifierObjective", "hps": "HPSv2Score"}[snippet]
    assert type(objective).__name__ == expected
    images = torch.rand(2, 1, 8, 8)  # what the digits model produces
    loss = objective(images, {"initial_images": torch.rand(2, 1, 8, 8)})
    assert loss.shape == (2,) and torch.isfinite(loss).all()


# -- registration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", registry.names("objectives"))
def test_objectives_are_registered_and_declared_as_entry_points(name):
    points = {ep.name: ep for ep in metadata.entry_points(group="sdo_lightning.objectives")}
    assert name in points, "run `pip install -e . --no-deps` to refresh the entry points"
    assert points[name].load() is registry.classes("objectives")[name]
