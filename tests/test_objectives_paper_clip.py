"""The paper's CLIP-vision objectives (CLIP style loss, LAION aesthetic score) on a tiny CLIP.

Values against references written here from the model's hidden states and the saved head
tensors; gradients against float64 central finite differences; per-sample independence.
"""

import numpy as np
import pytest
import torch

from objective_fixtures import assert_one_sentence, check_gradient, check_per_sample, rand, style_png, tiny_clip  # noqa: F401
from sdo_lightning.objectives import AestheticScore, CLIPStyleLoss
from sdo_lightning.testing.tiny_objective_models import aesthetic_state, build_tiny_clip_vision, save


@pytest.fixture(scope="module")
def clip_model(tiny_clip):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(tiny_clip).double().eval()


CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)


# -- CLIP style loss ------------------------------------------------------------------------------

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
