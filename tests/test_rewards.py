"""The rewards users optimize today: HPSv2.1 and PickScore.

Reference values come from other code paths: the tiny models' own encoders (open_clip's
``encode_image``/``encode_text``, CLIPModel's ``get_image_features``/``get_text_features``),
CLIPImageProcessor on a real photo and finite differences.
"""

import json
import warnings

import pytest
import torch

from objective_fixtures import assert_one_sentence, check_gradient, check_per_sample, rand
from sdo_lightning.objectives import CLIPScore, HPSv2Score, PickScore
from sdo_lightning.objectives.clip import CLIP_MEAN, CLIP_STD
from test_clip_preprocessing import assert_close_to_processor, differences, processed
from tiny_models import build_tiny_clip, build_tiny_tokenizer
from tiny_objective_models import TinyOpenCLIP, install_fake_open_clip, save, tiny_tokenize

LOGIT_SCALE = 3.3  # exp: 27.1, neither CLIP's init (14.3) nor PickScore's (about 100)


# -- HPSv2.1 --------------------------------------------------------------------------------------

def _hps_expected(model, x, prompts):
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in ((0.4, 0.45, 0.5), (0.25, 0.3, 0.2)))
    image = model.encode_image((x - mean) / std)
    text = model.encode_text(tiny_tokenize(prompts))
    return (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))


@pytest.mark.parametrize("layout", ["state_dict", "module_prefix", "bare"])
def test_hps_v2_1_checkpoint_loads_in_every_layout(monkeypatch, tmp_path, layout):
    """HPSv2's scorer loads both files as ``torch.load(f)["state_dict"]`` into open_clip's ViT-H-14;
    a DDP-prefixed (``module.``) or unwrapped state dict loads the same weights."""
    install_fake_open_clip(monkeypatch)
    model = TinyOpenCLIP(seed=43)  # differs from what the fake create_model builds
    state = model.state_dict()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}} if layout == "module_prefix" else (
        {"state_dict": state, "epoch": 1} if layout == "state_dict" else state)
    path = save(wrapped, tmp_path / "HPS_v2.1_compressed.pt")
    objective = HPSv2Score(str(path)).double()
    x, prompts = rand(2, 3, 16, 16, seed=44), ["a cat", "a dog"]
    with torch.no_grad():
        torch.testing.assert_close(objective(x, {"prompt": prompts}), -_hps_expected(model.double(), x, prompts),
                                   rtol=1e-10, atol=1e-12)


def test_hps_errors_name_both_checkpoints(monkeypatch, tmp_path):
    install_fake_open_clip(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"HPS_v2_compressed.pt or HPS_v2.1_compressed.pt") as e:
        HPSv2Score(str(tmp_path / "HPS_v2.1_compressed.pt"))
    assert_one_sentence(e)
    assert "HPS_v2.1_compressed.pt" in HPSv2Score.__doc__


# -- PickScore ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pick_dir(tmp_path_factory):
    """The tiny CLIP (input 32, no processor config) with its logit scale set to LOGIT_SCALE."""
    from transformers import CLIPModel

    root = build_tiny_clip(tmp_path_factory.mktemp("pickscore"))
    model = CLIPModel.from_pretrained(root)
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
    model.save_pretrained(root)
    return root


def _features(output):
    # transformers 5 returns a model output whose pooler_output is the projected embedding
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_pickscore_is_the_models_logit_scale_times_cosine(pick_dir):
    from transformers import CLIPModel, CLIPTokenizer

    objective = PickScore(str(pick_dir)).double()
    x = rand(3, 3, 32, 32, seed=40)  # the tower's input size: preprocessing is normalization only
    prompts = ["a red cat", "a blue dog", "a red cat"]
    clip = CLIPModel.from_pretrained(pick_dir).double().eval()
    tokens = CLIPTokenizer.from_pretrained(pick_dir)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
        image = _features(clip.get_image_features(pixel_values=(x - mean) / std))
        text = _features(clip.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))
        cosine = (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))
        expected = clip.logit_scale.exp() * cosine  # the saved scale: float32(3.3)
        loss = objective(x, {"prompt": prompts})
    assert clip.logit_scale.item() == pytest.approx(LOGIT_SCALE, abs=1e-6)
    torch.testing.assert_close(loss, -expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(objective.terms["pickscore"], expected, rtol=1e-10, atol=1e-10)
    fixed = PickScore(str(pick_dir), prompt="a blue dog").double()
    with torch.no_grad():
        torch.testing.assert_close(fixed(x[1:2], {}), -expected[1:2], rtol=1e-10, atol=1e-10)


def test_pickscore_preprocesses_with_clipscores_transform_like_the_processor(tmp_path):
    """The same code path as CLIPScore (checked in test_clip_preprocessing.py), and on the real photo
    the same pixels as CLIPImageProcessor with a processor config in the legacy int form the
    ViT-H-14 processor the PickScore authors load uses (short side 224, bicubic, crop 224)."""
    from sklearn.datasets import load_sample_image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    assert PickScore.preprocess is CLIPScore.preprocess and PickScore.image_embeds is CLIPScore.image_embeds
    torch.manual_seed(0)
    tokenizer, vocab = build_tiny_tokenizer(tmp_path)
    CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                         vocab_size=vocab, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                           image_size=224, patch_size=32),
        projection_dim=8,
    )).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "resample": 3, "size": 224}))
    photo = load_sample_image("china.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = processed(CLIPImageProcessor.from_pretrained(tmp_path), photo)
    objective = PickScore(str(tmp_path)).double()
    ours = objective.preprocess(torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].double() / 255)
    assert_close_to_processor(ours, reference)
    mean, p99, top = differences(ours, reference)
    assert mean < 0.006 and top < 0.1, (mean, p99, top)  # measured 0.0041 / 0.059, as CLIPScore's


@pytest.mark.parametrize("shape", [(2, 3, 48, 40), (2, 1, 24, 24)])  # resized and cropped; grayscale
def test_pickscore_gradient_and_per_sample(pick_dir, shape):
    objective = PickScore(str(pick_dir), prompt="a red cat").double()
    check_gradient(lambda y: objective(y, {}), rand(*shape, seed=41))
    check_per_sample(lambda y: objective(y, {}), rand(3, *shape[1:], seed=42))


def test_pickscore_errors_are_one_sentence(tmp_path, pick_dir):
    for model in (str(tmp_path / "nowhere"), "yuvalkirstain/PickScore_v1"):
        with pytest.raises(FileNotFoundError, match=r"`hf download yuvalkirstain/PickScore_v1`") as e:
            PickScore(model, local_files_only=True)
        assert_one_sentence(e)
    with pytest.raises(KeyError, match="PickScore has no text"):
        PickScore(str(pick_dir))(torch.rand(1, 3, 32, 32), {})
