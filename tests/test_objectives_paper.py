"""The paper's objectives (LPIPS, CLIP style, aesthetic, ImageNet classifier, HPSv2) on tiny models.

Every objective is loaded through the file / from_pretrained path users take; every value is
checked against a reference written here with plain torch ops from the saved tensors; every
gradient against a float64 central finite difference; every loss for per-sample independence.
torchvision, timm and open_clip are not installed here: fake modules stand in for them (see
tiny_objective_models.py), so their real APIs are not exercised by these tests.
"""

import re
from importlib import metadata

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdo_lightning.contracts import REGISTRY
from sdo_lightning.objectives import (
    AestheticScore,
    CLIPScore,
    CLIPStyleLoss,
    HPSv2Score,
    ImageClassifierObjective,
    LPIPSFidelity,
    WeightedSum,
)
from tiny_models import build_tiny_clip
from tiny_objective_models import (
    VGG16_BLOCKS,
    TinyClassifier,
    TinyOpenCLIP,
    aesthetic_state,
    build_tiny_clip_vision,
    install_fake_open_clip,
    install_fake_timm,
    install_fake_torchvision,
    lpips_lin_state,
    save,
    tiny_tokenize,
    vgg16_state,
)

NEW = ["AestheticScore", "CLIPStyleLoss", "HPSv2Score", "ImageClassifierObjective", "LPIPSFidelity"]


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
def clip_model(tiny_clip):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(tiny_clip).double().eval()


CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)


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


# -- CLIP style loss ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def style_png(tmp_path_factory):
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("style") / "style.png"
    Image.fromarray(pixels).save(path)
    return path, torch.from_numpy(pixels).double().permute(2, 0, 1)[None] / 255


def style_reference(clip_model, x, ref, layer):
    """Gram matrices by hand from the full (untruncated) model's hidden states."""
    def grams(img):
        hidden = clip_model.vision_model(pixel_values=(img - CLIP_MEAN) / CLIP_STD, output_hidden_states=True).hidden_states
        tokens = hidden[layer][:, 1:]
        return torch.einsum("bnd,bne->bde", tokens, tokens) / tokens.shape[1]
    return ((grams(x) - grams(ref)) ** 2).sum((1, 2))


@pytest.mark.parametrize("layer", [1, 2])
def test_style_loss_matches_hand_gram(tiny_clip, clip_model, style_png, layer):
    path, ref = style_png
    objective = CLIPStyleLoss(str(tiny_clip), reference=str(path), layer=layer).double()
    x = rand(2, 3, 32, 32, seed=8)
    with torch.no_grad():
        expected = style_reference(clip_model, x, ref, layer)
        torch.testing.assert_close(objective(x, {}), expected, rtol=1e-9, atol=0)
        assert (expected > 0).all()
        # the reference itself has zero style loss
        torch.testing.assert_close(objective(ref, {}), torch.zeros(1, dtype=torch.float64), rtol=0, atol=1e-12)


def test_style_loss_on_a_vision_only_model(tmp_path):
    """A CLIPVisionModel directory; 9 patch tokens of width 12, so normalizing by the wrong one shows."""
    from transformers import CLIPVisionModel

    root = build_tiny_clip_vision(tmp_path / "vision")
    pixels = np.random.default_rng(2).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    np.save(tmp_path / "style.npy", pixels)
    objective = CLIPStyleLoss(str(root), reference=str(tmp_path / "style.npy"), layer=2).double()
    model = CLIPVisionModel.from_pretrained(root).double().eval()
    ref = torch.from_numpy(pixels).double().permute(2, 0, 1)[None] / 255
    x = rand(2, 3, 24, 24, seed=28)
    with torch.no_grad():
        def grams(img):
            tokens = model(pixel_values=(img - CLIP_MEAN) / CLIP_STD, output_hidden_states=True).hidden_states[2][:, 1:]
            assert tokens.shape[1:] == (9, 12)
            return torch.einsum("bnd,bne->bde", tokens, tokens) / 9
        expected = ((grams(x) - grams(ref)) ** 2).sum((1, 2))
        torch.testing.assert_close(objective(x, {}), expected, rtol=1e-9, atol=0)


def test_style_loss_gradient_and_independence(tiny_clip, style_png):
    objective = CLIPStyleLoss(str(tiny_clip), reference=str(style_png[0]), layer=2).double()
    check_gradient(lambda x: objective(x, {}), rand(2, 3, 32, 32, seed=9))
    check_gradient(lambda x: objective(x, {}), rand(2, 1, 20, 24, seed=10))  # grayscale, resized and cropped
    check_per_sample(lambda x: objective(x, {}), rand(3, 3, 32, 32, seed=11))


def test_style_loss_errors_are_one_sentence(tiny_clip, style_png, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"style reference image .*missing.png' not found; give the path") as e:
        CLIPStyleLoss(str(tiny_clip), reference=str(tmp_path / "missing.png"))
    assert_one_sentence(e)
    with pytest.raises(FileNotFoundError, match="could not load a CLIP vision model") as e:
        CLIPStyleLoss(str(tmp_path / "no_model"), reference=str(style_png[0]), local_files_only=True)
    assert_one_sentence(e)
    with pytest.raises(ValueError, match="has 2 encoder layers; choose 0 to 2") as e:
        CLIPStyleLoss(str(tiny_clip), reference=str(style_png[0]), layer=3)
    assert_one_sentence(e)


# -- aesthetic score ------------------------------------------------------------------------------

def aesthetic_reference(clip_model, x, state):
    pooled = clip_model.vision_model(pixel_values=(x - CLIP_MEAN) / CLIP_STD).pooler_output
    e = clip_model.visual_projection(pooled)
    h = e / e.norm(dim=-1, keepdim=True)
    s = {k: v.double() for k, v in state.items()}
    if "weight" in s:
        return (h @ s["weight"].T + s["bias"])[:, 0]
    for i in (0, 2, 4, 6, 7):  # the improved predictor has no activations between its linears
        h = h @ s[f"layers.{i}.weight"].T + s[f"layers.{i}.bias"]
    return h[:, 0]


@pytest.mark.parametrize("kind", ["improved", "linear"])
def test_aesthetic_score_matches_hand_mlp(tiny_clip, clip_model, tmp_path, kind):
    name = "sac+logos+ava1-l14-linearMSE.pth" if kind == "improved" else "sa_0_4_vit_l_14_linear.pth"
    state = aesthetic_state(kind, dim=8)
    objective = AestheticScore(str(save(state, tmp_path / name)), model=str(tiny_clip)).double()
    x = rand(3, 3, 32, 32, seed=12)
    with torch.no_grad():
        expected = aesthetic_reference(clip_model, x, state)
        torch.testing.assert_close(objective(x, {}), -expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(objective.terms["aesthetic"], expected, rtol=1e-10, atol=1e-12)
        paper = AestheticScore(str(tmp_path / name), model=str(tiny_clip), target=10.0).double()
        torch.testing.assert_close(paper(x, {}), (expected - 10).abs(), rtol=1e-10, atol=1e-12)


def test_aesthetic_score_gradient_and_independence(tiny_clip, tmp_path):
    path = save(aesthetic_state("improved", dim=8), tmp_path / "mlp.pth")
    objective = AestheticScore(str(path), model=str(tiny_clip)).double()
    check_gradient(lambda x: objective(x, {}), rand(2, 3, 32, 32, seed=13))
    check_per_sample(lambda x: objective(x, {}), rand(3, 1, 32, 32, seed=14))


def test_aesthetic_errors_are_one_sentence(tiny_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"aesthetic MLP weights file .* not found; download sac\+logos") as e:
        AestheticScore(str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), model=str(tiny_clip))
    assert_one_sentence(e)
    wide = save(aesthetic_state("improved", dim=768), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="takes 768-dim embeddings but CLIP .* gives 8-dim ones; use the CLIP model") as e:
        AestheticScore(str(wide), model=str(tiny_clip))
    assert_one_sentence(e)
    odd = save({"fc.weight": torch.zeros(1, 8)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="neither the improved predictor's") as e:
        AestheticScore(str(odd), model=str(tiny_clip))
    assert_one_sentence(e)
    with pytest.raises(FileNotFoundError, match="could not load a CLIP model") as e:
        AestheticScore(str(wide), model=str(tmp_path / "no_model"), local_files_only=True)
    assert_one_sentence(e)


# -- ImageNet-style classifier (torchvision / timm faked) -----------------------------------------

def classifier_logits(net, x, mean, std, crop):
    """Inputs of 20 x 20 with resize 20 need no interpolation: center crop by slicing."""
    off = (x.shape[-1] - crop) // 2
    x = x[..., off:off + crop, off:off + crop]
    mean, std = (torch.tensor(v, dtype=x.dtype).view(1, 3, 1, 1) for v in (mean, std))
    return net.double()((x - mean) / std)


def test_torchvision_classifier_targeted_uses_weights_meta(monkeypatch):
    calls = install_fake_torchvision(monkeypatch, crop=16, resize=20)
    objective = ImageClassifierObjective("torchvision/tinynet", weights="IMAGENET1K_V1", target_class=2).double()
    assert calls[0][0] == "tinynet" and calls[0][1].name == "IMAGENET1K_V1"
    assert (objective.crop, objective.resize, objective.interpolation) == (16, 20, "bilinear")
    x = rand(3, 3, 20, 20, seed=15)
    logits = classifier_logits(TinyClassifier(seed=7), x, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), crop=16)
    expected = -logits.log_softmax(-1)[:, 2]
    with torch.no_grad():
        torch.testing.assert_close(objective(x, {}), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(objective.terms["target_prob"], (-expected).exp())
        torch.testing.assert_close(objective.terms["success"], (logits.argmax(-1) == 2).double())
        # without target_class, the batch's "target" is used
        free = ImageClassifierObjective("torchvision/tinynet", weights="IMAGENET1K_V1").double()
        target = torch.tensor([0, 4, 1])
        torch.testing.assert_close(free(x, {"target": target}), -logits.log_softmax(-1).gather(1, target[:, None])[:, 0])
    check_gradient(lambda y: objective(y, {}), rand(2, 3, 20, 20, seed=16))
    check_gradient(lambda y: objective(y, {}), rand(2, 1, 12, 12, seed=17))  # upscaled, grayscale
    check_per_sample(lambda y: objective(y, {}), rand(3, 3, 20, 20, seed=18))


def test_torchvision_classifier_untargeted_and_weights_file(monkeypatch, tmp_path):
    install_fake_torchvision(monkeypatch)
    net = TinyClassifier(seed=3)
    path = save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "resnet.pth")  # a DDP checkpoint
    objective = ImageClassifierObjective("torchvision/tinynet", weights=str(path), untargeted=True, image_size=20).double()
    x, init = rand(3, 3, 20, 20, seed=19), rand(3, 3, 20, 20, seed=20)
    imagenet = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    with torch.no_grad():
        logits = classifier_logits(net, x, *imagenet, crop=20)
        source = classifier_logits(net, init, *imagenet, crop=20).argmax(-1)
        expected = logits.log_softmax(-1).gather(1, source[:, None])[:, 0]  # -CE(source) = log p(source)
        torch.testing.assert_close(objective(x, {"initial_images": init}), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(objective.terms["success"], (logits.argmax(-1) != source).double())
        labels = ImageClassifierObjective("torchvision/tinynet", weights=str(path), untargeted=True, image_size=20,
                                          label_key="class_label").double()
        label = torch.tensor([1, 1, 3])
        torch.testing.assert_close(labels(x, {"class_label": label}), logits.log_softmax(-1).gather(1, label[:, None])[:, 0])
    check_gradient(lambda y: objective(y, {"initial_images": init[:2]}), rand(2, 3, 20, 20, seed=21))


def test_timm_classifier_pretrained_cfg_and_checkpoint(monkeypatch, tmp_path):
    calls = install_fake_timm(monkeypatch)
    objective = ImageClassifierObjective("timm/tinynet.in1k", target_class=1).double()
    assert calls == [("tinynet.in1k", True)]
    assert (objective.crop, objective.resize, objective.interpolation) == (16, 20, "bicubic")
    x = rand(2, 3, 20, 20, seed=22)  # crop_pct 0.8 of 16 -> resize 20: only the center crop acts
    logits = classifier_logits(TinyClassifier(seed=11), x, (0.45, 0.5, 0.55), (0.3, 0.2, 0.25), crop=16)
    with torch.no_grad():
        torch.testing.assert_close(objective(x, {}), -logits.log_softmax(-1)[:, 1], rtol=1e-10, atol=1e-12)
    net = TinyClassifier(seed=5)
    path = save({"state_dict": net.state_dict()}, tmp_path / "ckpt.pth")
    from_file = ImageClassifierObjective("timm/tinynet", weights=str(path), target_class=1).double()
    assert calls[-1] == ("tinynet", False)
    logits = classifier_logits(net, x, (0.45, 0.5, 0.55), (0.3, 0.2, 0.25), crop=16)
    with torch.no_grad():
        torch.testing.assert_close(from_file(x, {}), -logits.log_softmax(-1)[:, 1], rtol=1e-10, atol=1e-12)
    check_gradient(lambda y: from_file(y, {}), rand(2, 3, 20, 20, seed=23))


def test_classifier_errors_are_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "torchvision", None)  # import fails as if not installed
    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    with pytest.raises(ModuleNotFoundError, match=r"needs torchvision .*`pip install torchvision`") as e:
        ImageClassifierObjective("torchvision/resnet50", weights="IMAGENET1K_V2")
    assert_one_sentence(e)
    with pytest.raises(ModuleNotFoundError, match=r"needs timm .*`pip install timm`") as e:
        ImageClassifierObjective("timm/resnet50.a1_in1k")
    assert_one_sentence(e)
    with pytest.raises(ValueError, match="write 'torchvision/<name>'") as e:
        ImageClassifierObjective("resnet50")
    assert_one_sentence(e)
    install_fake_torchvision(monkeypatch)
    install_fake_timm(monkeypatch)
    with pytest.raises(ValueError, match=r"has no weights 'IMAGENET1K_V9'; choose one of \['IMAGENET1K_V1', 'DEFAULT'\]") as e:
        ImageClassifierObjective("torchvision/tinynet", weights="IMAGENET1K_V9")
    assert_one_sentence(e)
    with pytest.raises(ValueError, match="torchvision has no classifier 'resnet9000'") as e:
        ImageClassifierObjective("torchvision/resnet9000")
    assert_one_sentence(e)
    with pytest.raises(FileNotFoundError, match=r"classifier weights file .*missing.pth' not found") as e:
        ImageClassifierObjective("timm/tinynet", weights=str(tmp_path / "missing.pth"))
    assert_one_sentence(e)
    with pytest.raises(FileNotFoundError, match=r"could not create timm/resnet9000 with pretrained weights \(Unknown model") as e:
        ImageClassifierObjective("timm/resnet9000")
    assert_one_sentence(e)
    wrong = save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not fit 'torchvision/tinynet'") as e:
        ImageClassifierObjective("torchvision/tinynet", weights=str(wrong))
    assert_one_sentence(e)
    objective = ImageClassifierObjective("torchvision/tinynet")
    with pytest.raises(KeyError, match="no target"):
        objective(torch.rand(1, 3, 20, 20), {})


# -- HPSv2 (open_clip faked) ----------------------------------------------------------------------

@pytest.fixture
def hps_checkpoint(tmp_path):
    model = TinyOpenCLIP(seed=42)  # differs from what create_model builds: the checkpoint must be loaded
    return save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "HPS_v2_compressed.pt"), model


def test_hps_score_is_the_cosine_of_the_checkpoint_model(monkeypatch, hps_checkpoint):
    record = install_fake_open_clip(monkeypatch)
    path, model = hps_checkpoint
    objective = HPSv2Score(str(path)).double()
    assert record["create"] == [("ViT-H-14", None)]
    model = model.double()
    x = rand(3, 3, 16, 16, seed=24)
    prompts = ["a painting of a cat", "a painting of a dog", "a painting of a cat"]
    with torch.no_grad():
        mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in ((0.4, 0.45, 0.5), (0.25, 0.3, 0.2)))
        image = model.encode_image((x - mean) / std)
        text = model.encode_text(tiny_tokenize(prompts))
        expected = (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))
        torch.testing.assert_close(objective(x, {"prompt": prompts}), -expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(objective.terms["hps"], expected, rtol=1e-10, atol=1e-12)
    assert record["tokenized"] == prompts[:2]  # each prompt tokenized once, then cached
    objective(x, {"prompt": prompts})
    assert record["tokenized"] == prompts[:2]
    fixed = HPSv2Score(str(path), prompt="a painting of a dog").double()
    check_gradient(lambda y: fixed(y, {}), rand(2, 3, 16, 16, seed=25))
    check_gradient(lambda y: fixed(y, {}), rand(2, 1, 24, 20, seed=26))  # grayscale, resized and padded
    check_per_sample(lambda y: fixed(y, {}), rand(3, 3, 16, 16, seed=27))


def test_hps_pads_non_square_images_like_open_clips_resize_max_size(monkeypatch, hps_checkpoint):
    """A 12 x 8 image (model input 16): long side resized to 16 (short side to 11), then padded
    with 2 black columns left and 3 right, before normalization; a square 16 x 16 passes as it is."""
    install_fake_open_clip(monkeypatch)
    path, model = hps_checkpoint
    objective = HPSv2Score(str(path), prompt="a cat").double()
    model = model.double()
    x = rand(2, 3, 12, 8, seed=28)
    with torch.no_grad():
        resized = torch.nn.functional.interpolate(x, size=(16, 11), mode="bicubic", align_corners=False, antialias=True)
        square = torch.zeros(2, 3, 16, 16, dtype=torch.float64)
        square[..., :, 2:13] = resized
        mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in ((0.4, 0.45, 0.5), (0.25, 0.3, 0.2)))
        image = model.encode_image((square - mean) / std)
        text = model.encode_text(tiny_tokenize(["a cat"]))
        expected = (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))
        torch.testing.assert_close(objective(x, {}), -expected, rtol=1e-10, atol=1e-12)


def test_hps_errors_are_one_sentence(monkeypatch, hps_checkpoint, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "open_clip", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'sdo-lightning\[hps\]'.*HPS_v2_compressed.pt") as e:
        HPSv2Score(str(hps_checkpoint[0]))
    assert_one_sentence(e)
    install_fake_open_clip(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"HPSv2 checkpoint .*nowhere.pt' not found; download HPS_v2_compressed.pt") as e:
        HPSv2Score(str(tmp_path / "nowhere.pt"))
    assert_one_sentence(e)
    partial = save({"state_dict": {"logit_scale": torch.tensor(1.0)}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="lacks .* weights of open_clip ViT-H-14") as e:
        HPSv2Score(str(partial))
    assert_one_sentence(e)
    with pytest.raises(KeyError, match="no text"):
        HPSv2Score(str(hps_checkpoint[0]))(torch.rand(1, 3, 16, 16), {})


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

@pytest.mark.parametrize("name", NEW)
def test_new_objectives_are_registered_and_declared_as_entry_points(name):
    points = {ep.name: ep for ep in metadata.entry_points(group="sdo_lightning.objectives")}
    assert name in points, "run `pip install -e . --no-deps` to refresh the entry points"
    assert points[name].load() is REGISTRY["objectives"][name]
