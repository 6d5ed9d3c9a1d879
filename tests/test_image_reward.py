"""ImageRewardScore on a tiny random ImageReward saved in the released ``ImageReward.pt`` key layout.

The expected scores come from a plain-torch forward written here from the released architecture
(ImageReward.py, BLIP's vit.py and med.py): patch embedding, pre-norm ViT blocks (LayerNorm eps
1e-6, fused qkv), post-norm BERT layers (eps 1e-12) with self-attention under med.py's additive
-10000 padding mask, cross-attention to every image token and a GELU feed-forward, the [CLS]
feature through the MLP's five linear layers, then ``(r - mean) / std`` with the released constants;
the prompt's token ids are written out by hand. None of it goes through transformers' BLIP modules
or the objective's key mapping.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from objective_fixtures import assert_one_sentence, check_gradient, check_per_sample, rand
from sdo_lightning.objectives import ImageRewardScore
from tiny_image_reward import (HEADS, IMAGE, PATCH, TEXT_DEPTH, VISION_DEPTH, image_reward_state,
                               save_tiny_image_reward, token_id)

# ImageReward.py: Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
# self.mean = 0.16717362830052426, self.std = 1.0333394966054072
PIXEL_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
PIXEL_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072

SHORT = "a green cats"  # [CLS] a green cat ##s [SEP], then 30 x [PAD]
LONG = " ".join(["the photo of a dog"] * 10)  # 50 words: truncated to [CLS] + 33 words + [SEP]


def hand_tokens(prompt):
    """The ids and mask ImageReward feeds the text encoder: max_length 35, padded, truncated."""
    if prompt == SHORT:
        ids = ["[CLS]", "a", "green", "cat", "##s", "[SEP]"]
    else:
        ids = ["[CLS]"] + prompt.split()[:33] + ["[SEP]"]
    mask = [1] * len(ids) + [0] * (35 - len(ids))
    ids = ids + ["[PAD]"] * (35 - len(ids))
    return torch.tensor([token_id(t) for t in ids]), torch.tensor(mask)


def linear(s, key, x):
    return F.linear(x, s[key + ".weight"], s[key + ".bias"])


def layer_norm(s, key, x, eps):
    return F.layer_norm(x, x.shape[-1:], s[key + ".weight"], s[key + ".bias"], eps)


def attend(q, k, v, bias=None):
    """Multi-head scaled dot-product attention of projected q (B, Lq, W) on k, v (B, Lk, W)."""
    b, lq, w = q.shape
    d = w // HEADS

    def heads(x):
        return x.reshape(b, x.shape[1], HEADS, d).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(b, lq, w)


def reference_vit(s, pixels):
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)  # (B, patches, W), row-major over the grid
    x = torch.cat([s[v + "cls_token"].expand(len(x), -1, -1), x], 1) + s[v + "pos_embed"]
    for i in range(VISION_DEPTH):
        b = f"{v}blocks.{i}."
        q, k, val = linear(s, b + "attn.qkv", layer_norm(s, b + "norm1", x, 1e-6)).chunk(3, dim=-1)
        x = x + linear(s, b + "attn.proj", attend(q, k, val))
        x = x + linear(s, b + "mlp.fc2", F.gelu(linear(s, b + "mlp.fc1", layer_norm(s, b + "norm2", x, 1e-6))))
    return layer_norm(s, v + "norm", x, 1e-6)


def reference_text(s, ids, mask, image_tokens):
    t = "blip.text_encoder."
    x = s[t + "embeddings.word_embeddings.weight"][ids] + s[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = layer_norm(s, t + "embeddings.LayerNorm", x, 1e-12)
    padding = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
    for i in range(TEXT_DEPTH):
        b = f"{t}encoder.layer.{i}."
        for name, source, bias in (("attention", x, padding), ("crossattention", image_tokens, None)):
            a = b + name + "."
            context = attend(linear(s, a + "self.query", x), linear(s, a + "self.key", source),
                             linear(s, a + "self.value", source), bias)
            x = layer_norm(s, a + "output.LayerNorm", x + linear(s, a + "output.dense", context), 1e-12)
        hidden = F.gelu(linear(s, b + "intermediate.dense", x))
        x = layer_norm(s, b + "output.LayerNorm", x + linear(s, b + "output.dense", hidden), 1e-12)
    return x


def reference_reward(state, images, prompts):
    """ImageReward's normalized score of images already at the model's input size."""
    s = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    pixels = (images.double() - PIXEL_MEAN) / PIXEL_STD
    ids, mask = map(torch.stack, zip(*(hand_tokens(p) for p in prompts)))
    feature = reference_text(s, ids, mask, reference_vit(s, pixels))[:, 0]
    for i in (0, 2, 4, 6, 7):
        feature = linear(s, f"mlp.layers.{i}", feature)
    return (feature[:, 0] - REWARD_MEAN) / REWARD_STD


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_image_reward(tmp_path_factory.mktemp("image_reward"))


@pytest.fixture(scope="module")
def objective(tiny):
    checkpoint, tokenizer = tiny
    return ImageRewardScore(checkpoint, tokenizer=str(tokenizer), local_files_only=True).double()


def test_score_equals_a_reference_forward_of_the_released_architecture(objective):
    images = rand(2, 3, IMAGE, IMAGE)
    loss = objective(images, {"prompt": [SHORT, LONG]})
    expected = reference_reward(image_reward_state(), images, [SHORT, LONG])
    assert expected.std() > 0.05  # two different, non-trivial scores
    torch.testing.assert_close(loss, -expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(objective.terms["image_reward"], expected, rtol=1e-10, atol=1e-10)


def test_a_fixed_prompt_is_used_for_every_sample(tiny):
    checkpoint, tokenizer = tiny
    fixed = ImageRewardScore(checkpoint, tokenizer=str(tokenizer), prompt=SHORT).double()
    images = rand(2, 3, IMAGE, IMAGE, seed=3)
    expected = reference_reward(image_reward_state(), images, [SHORT, SHORT])
    torch.testing.assert_close(fixed(images, {}), -expected, rtol=1e-10, atol=1e-10)


def test_larger_images_are_resized_bicubic_and_center_cropped_as_imagereward_does(objective):
    """ImageReward's transform (Resize(224, bicubic) of the short side, CenterCrop(224)) done with
    PIL on float pixels, channel by channel; a 64 x 96 image becomes 32 x 48, cropped at column 8."""
    from PIL import Image

    images = rand(1, 3, 2 * IMAGE, 3 * IMAGE, seed=5)
    channels = [np.asarray(Image.fromarray(c.float().numpy(), mode="F").resize((3 * IMAGE // 2, IMAGE),
                                                                               Image.BICUBIC))
                for c in images[0]]
    resized = torch.from_numpy(np.stack(channels)).double()[None]
    expected = reference_reward(image_reward_state(), resized[..., 8:8 + IMAGE], [SHORT])
    # PIL's float bicubic and torch's antialiased one differ by float32 rounding only (measured 5e-9)
    torch.testing.assert_close(objective(images, {"prompt": SHORT}), -expected, rtol=0, atol=1e-6)
    # what the tolerance tells apart: the crop a column off (0.11 away), the whole image squashed (0.33)
    shifted = reference_reward(image_reward_state(), resized[..., 9:9 + IMAGE], [SHORT])
    squashed = F.interpolate(images, size=(IMAGE, IMAGE), mode="bicubic", antialias=True, align_corners=False)
    for other in (shifted, reference_reward(image_reward_state(), squashed, [SHORT])):
        assert (other - expected).abs().item() > 1e-2


def test_gradient_equals_finite_differences(objective):
    check_gradient(lambda x: objective(x, {"prompt": [SHORT, LONG]}), rand(2, 3, 24, 24, seed=7))


def test_sample_i_depends_on_image_i_alone(objective):
    check_per_sample(lambda x: objective(x, {"prompt": SHORT}), rand(3, 3, 20, 20, seed=8))


def test_grey_images_are_scored_as_rgb(objective):
    grey = rand(2, 1, IMAGE, IMAGE, seed=9)
    expected = reference_reward(image_reward_state(), grey.expand(-1, 3, -1, -1), [SHORT, SHORT])
    torch.testing.assert_close(objective(grey, {"prompt": SHORT}), -expected, rtol=1e-10, atol=1e-10)


def test_missing_files_say_what_to_fetch(tiny, tmp_path):
    checkpoint, tokenizer = tiny
    with pytest.raises(FileNotFoundError, match=r"hf download THUDM/ImageReward ImageReward\.pt") as excinfo:
        ImageRewardScore(tmp_path / "ImageReward.pt", tokenizer=str(tokenizer))
    assert_one_sentence(excinfo)
    with pytest.raises(FileNotFoundError, match="hf download bert-base-uncased") as excinfo:
        ImageRewardScore(checkpoint, tokenizer=str(tmp_path / "no-tokenizer"), local_files_only=True)
    assert_one_sentence(excinfo)


def test_a_checkpoint_lacking_a_released_weight_is_named(tiny, tmp_path):
    state = image_reward_state()
    del state["blip.visual_encoder.blocks.1.attn.proj.weight"]
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match=r"'blip\.visual_encoder\.blocks\.1\.attn\.proj\.weight'") as excinfo:
        ImageRewardScore(tmp_path / "ImageReward.pt", tokenizer=str(tiny[1]))
    assert_one_sentence(excinfo)
    state = image_reward_state()
    del state["blip.text_encoder.encoder.layer.0.crossattention.output.dense.bias"]
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match=r"crossattention\.output\.dense\.bias") as excinfo:
        ImageRewardScore(tmp_path / "ImageReward.pt", tokenizer=str(tiny[1]))
    assert_one_sentence(excinfo)


def test_served_by_sdo_serve_reward_it_equals_in_process(tiny):
    """docs/image_reward.md's command: the served losses and image gradient equal the in-process ones."""
    from sdo_lightning.objectives import RemoteObjective
    from test_reward_server import gradient_of, start_server, stop

    checkpoint, tokenizer = tiny
    proc, address = start_server("--objective", "ImageRewardScore", "--objective.checkpoint", str(checkpoint),
                                 "--objective.tokenizer", str(tokenizer))
    try:
        g = torch.Generator().manual_seed(2)
        images, weights = torch.rand(2, 3, 24, 24, generator=g), torch.randn(2, generator=g)
        batch = {"prompt": [SHORT, LONG], "index": torch.arange(2)}
        want = gradient_of(ImageRewardScore(checkpoint, tokenizer=str(tokenizer)), images, batch, weights)
        got = gradient_of(RemoteObjective(address, fields=["prompt"]), images, batch, weights)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    finally:
        stop(proc)
