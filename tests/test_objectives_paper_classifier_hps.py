"""The paper's ImageNet-classifier objective and HPSv2 score, with torchvision, timm and open_clip faked.

Those packages are not installed here: fake modules stand in for them (see
tiny_objective_models.py), so their real APIs are not exercised by these tests. Values against
references written here from the saved tensors; gradients against float64 central finite
differences; per-sample independence.
"""

import pytest
import torch

from objective_fixtures import assert_one_sentence, check_gradient, check_per_sample, rand
from sdo_lightning.objectives import HPSv2Score, ImageClassifierObjective
from sdo_lightning.testing.tiny_objective_models import (
    TinyClassifier,
    TinyOpenCLIP,
    install_fake_open_clip,
    install_fake_timm,
    install_fake_torchvision,
    save,
    tiny_tokenize,
)


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
