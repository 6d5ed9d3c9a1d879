"""A tiny random ImageReward saved as the released ``ImageReward.pt`` is laid out, with a tiny BERT tokenizer.

The weights are drawn here, tensor by tensor, under the released key names (BLIP's ViT ``blocks.N.*``,
BLIP's med.py BERT ``encoder.layer.N.*`` with ``crossattention``, the MLP's ``layers.N.*``); no
module of the objective under test is used to build them.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

# sizes of the tiny model: 64-dim heads as in the release (ViT-L/16: 1024 / 16, BERT-base: 768 / 12)
VISION_WIDTH, VISION_DEPTH, PATCH, IMAGE = 128, 2, 8, 32  # 4 x 4 patches + the class token
TEXT_WIDTH, TEXT_DEPTH, POSITIONS = 128, 2, 40
HEAD_WIDTHS = (TEXT_WIDTH, 16, 8, 8, 4, 1)  # the release: 768-1024-128-64-16-1
HEADS = 2

WORDS = ["a", "an", "the", "of", "and", "photo", "red", "green", "blue", "cat", "dog", "on", "in", "sky"]
LETTERS = [c for c in string.ascii_lowercase if c not in WORDS]  # "a" is a word already
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + LETTERS + ["##" + c for c in string.ascii_lowercase]
# BLIP's tokenizer adds [DEC] and [ENC] after the vocab (bert-base-uncased: 30522 + 2 = 30524 embeddings)
VOCAB_SIZE = len(VOCAB) + 2


def token_id(token: str) -> int:
    return VOCAB.index(token)


def build_tiny_bert_tokenizer(root: Path) -> Path:
    """A word-piece BERT tokenizer over :data:`VOCAB` (whole words, letters and ``##`` letters), saved in ``root``."""
    from transformers import BertTokenizer

    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)}, do_lower_case=True).save_pretrained(root)
    return root


def image_reward_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ImageReward state dict under the released keys (``blip.visual_encoder.*``,
    ``blip.text_encoder.*``, ``blip.vision_proj``/``text_proj`` and ``mlp.layers.*``)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def linear(state, key, n_out, n_in):
        state[key + ".weight"] = rnd(n_out, n_in, scale=n_in ** -0.5)
        state[key + ".bias"] = rnd(n_out, scale=0.1)

    def layer_norm(state, key, n):
        state[key + ".weight"] = 1 + rnd(n, scale=0.1)
        state[key + ".bias"] = rnd(n, scale=0.1)

    state: dict[str, torch.Tensor] = {}
    v, d = "blip.visual_encoder.", VISION_WIDTH
    state[v + "cls_token"] = rnd(1, 1, d, scale=0.5)
    state[v + "pos_embed"] = rnd(1, (IMAGE // PATCH) ** 2 + 1, d, scale=0.5)
    state[v + "patch_embed.proj.weight"] = rnd(d, 3, PATCH, PATCH, scale=(3 * PATCH * PATCH) ** -0.5)
    state[v + "patch_embed.proj.bias"] = rnd(d, scale=0.1)
    for i in range(VISION_DEPTH):
        b = f"{v}blocks.{i}."
        layer_norm(state, b + "norm1", d)
        linear(state, b + "attn.qkv", 3 * d, d)
        linear(state, b + "attn.proj", d, d)
        layer_norm(state, b + "norm2", d)
        linear(state, b + "mlp.fc1", 4 * d, d)
        linear(state, b + "mlp.fc2", d, 4 * d)
    layer_norm(state, v + "norm", d)

    t, w = "blip.text_encoder.", TEXT_WIDTH
    state[t + "embeddings.word_embeddings.weight"] = rnd(VOCAB_SIZE, w)
    state[t + "embeddings.position_embeddings.weight"] = rnd(POSITIONS, w, scale=0.5)
    state[t + "embeddings.position_ids"] = torch.arange(POSITIONS)[None]  # a buffer the release saved
    layer_norm(state, t + "embeddings.LayerNorm", w)
    for i in range(TEXT_DEPTH):
        b = f"{t}encoder.layer.{i}."
        for attention, source in (("attention", w), ("crossattention", d)):
            linear(state, f"{b}{attention}.self.query", w, w)
            linear(state, f"{b}{attention}.self.key", w, source)
            linear(state, f"{b}{attention}.self.value", w, source)
            linear(state, f"{b}{attention}.output.dense", w, w)
            layer_norm(state, f"{b}{attention}.output.LayerNorm", w)
        linear(state, b + "intermediate.dense", 4 * w, w)
        linear(state, b + "output.dense", w, 4 * w)
        layer_norm(state, b + "output.LayerNorm", w)
    linear(state, "blip.vision_proj", 16, d)  # BLIP's contrastive projections: in the file, unused by the score
    linear(state, "blip.text_proj", 16, w)
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(HEAD_WIDTHS[:-1], HEAD_WIDTHS[1:])):
        linear(state, f"mlp.layers.{i}", n_out, n_in)
    return state


def save_tiny_image_reward(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """``root/ImageReward.pt`` (a plain state dict, as released) and a tokenizer directory ``root/bert``."""
    root.mkdir(parents=True, exist_ok=True)
    checkpoint = root / "ImageReward.pt"
    torch.save(image_reward_state(seed), checkpoint)
    return checkpoint, build_tiny_bert_tokenizer(root / "bert")
