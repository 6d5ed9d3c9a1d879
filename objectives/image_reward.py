"""ImageReward (Xu et al., NeurIPS 2023): BLIP's ViT image tower, its BERT text encoder that
cross-attends to the image, and an MLP head trained on people's rankings of generated images.

Notation (the released ``ImageReward.pt`` key prefixes -> the modules here):

    blip.visual_encoder.*  -> ``vision``: transformers' ``BlipVisionModel`` (a ViT-L/16 at 224 px)
    blip.text_encoder.*    -> ``text``: transformers' ``BlipTextModel`` (BERT-base, cross-attention)
    mlp.layers.*           -> ``head``: Linear layers 0, 2, 4, 6, 7 with dropout between (no activations)
    blip.vision_proj/text_proj  unused by the score (BLIP's contrastive projections)

The score of an image ``x`` for a prompt ``p``:

    1. pixels = CLIP-normalize(center-crop(resize_bicubic(x, 224)))
    2. v = ViT(pixels)                           all tokens, after the final LayerNorm: (B, 197, 1024)
    3. h = BERT(tokens(p), cross-attending to v)  tokens padded/truncated to 35: (B, 35, 768)
    4. r = MLP(h[:, 0])                          the [CLS] token's feature
    5. score = (r - mean) / std                  the released normalisation constants
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import Tensor

from sdo_lightning._hub import offline
from sdo_lightning.contracts import Objective
from sdo_lightning.objectives._inputs import as_rgb, load_state_dict, normalize, prompts_for, resize_center_crop
from sdo_lightning.objectives.aesthetic import IMPROVED_LINEARS, ImprovedAestheticMLP
from sdo_lightning.objectives.clip import CLIP_MEAN, CLIP_STD

CHECKPOINT_HOW = ("download ImageReward.pt (`hf download THUDM/ImageReward ImageReward.pt --local-dir .`) and pass "
                  "its path as checkpoint")
TOKENIZER_HOW = ("fetch BLIP's text tokenizer with `hf download bert-base-uncased` (the hub id then loads from the "
                 "cache, also offline) or pass a directory that holds a BERT vocab.txt as tokenizer")
# ImageReward.py's reward normalisation: the mean and std of the raw MLP output over its training set.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
# The prompt is padded and truncated to 35 tokens ([CLS] ... [SEP] [PAD]...), as ImageReward tokenizes it.
MAX_TOKENS = 35
# The file records no head counts; both released towers have 64-dim heads (ViT-L: 1024 / 16, BERT-base: 768 / 12).
HEAD_DIM = 64
VIT_LAYER_NORM_EPS = 1e-6  # BLIP's ViT (timm's LayerNorm eps)
BERT_LAYER_NORM_EPS = 1e-12  # ImageReward's med_config.json

# released ViT key -> transformers BlipVisionModel key ("{}" is a block index)
VISION_KEYS = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("blocks.{}.norm1.", "encoder.layers.{}.layer_norm1."),
    ("blocks.{}.attn.qkv.", "encoder.layers.{}.self_attn.qkv."),
    ("blocks.{}.attn.proj.", "encoder.layers.{}.self_attn.projection."),
    ("blocks.{}.norm2.", "encoder.layers.{}.layer_norm2."),
    ("blocks.{}.mlp.", "encoder.layers.{}.mlp."),
    ("norm.", "post_layernorm."),
)
# BLIP's med.py is the module layout transformers' BlipTextModel was ported from: the keys are the same.
TEXT_KEYS = (("", ""),)


def _rename(key: str, table: tuple[tuple[str, str], ...], inverse: bool = False) -> str | None:
    """``key`` with its prefix renamed by ``table`` (the other way when ``inverse``); None if no prefix fits."""
    for source, target in table:
        if inverse:
            source, target = target, source
        match = re.match(re.escape(source).replace(r"\{\}", r"(\d+)"), key)
        if match:
            return target.format(*match.groups()) + key[match.end():]
    return None


def _count(state: dict[str, Tensor], pattern: str) -> int:
    """How many indices ``i`` have a key ``pattern.format(i)``."""
    i = 0
    while pattern.format(i) in state:
        i += 1
    return i


def _sub(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def _need(state: dict[str, Tensor], key: str, prefix: str, path: str) -> Tensor:
    if key not in state:
        raise ValueError(f"ImageReward checkpoint {path!r} has no {prefix + key!r} (is it ImageReward.pt?); "
                         f"{CHECKPOINT_HOW}.")
    return state[key]


def _load(model: torch.nn.Module, state: dict[str, Tensor], table: tuple[tuple[str, str], ...], prefix: str,
          path: str) -> None:
    """Load the released weights under ``prefix`` into ``model`` through the key ``table``."""
    mapped = {}
    for key, value in state.items():
        new = _rename(key, table)
        if new is not None:
            mapped[new] = value
    try:
        missing = model.load_state_dict(mapped, strict=False).missing_keys
    except RuntimeError:
        raise ValueError(f"ImageReward checkpoint {path!r} has weights under {prefix!r} of mismatched sizes; "
                         f"{CHECKPOINT_HOW}.") from None
    if missing:
        raise ValueError(f"ImageReward checkpoint {path!r} lacks {len(missing)} weights "
                         f"(e.g. {prefix + (_rename(missing[0], table, inverse=True) or missing[0])!r}); "
                         f"{CHECKPOINT_HOW}.")


def build_vision(state: dict[str, Tensor], path: str) -> torch.nn.Module:
    """BLIP's ViT as a transformers ``BlipVisionModel``, sized from the released weights ``state``."""
    from transformers import BlipVisionConfig, BlipVisionModel

    prefix = "blip.visual_encoder."
    patch = _need(state, "patch_embed.proj.weight", prefix, path)
    width, positions = patch.shape[0], _need(state, "pos_embed", prefix, path).shape[1]
    grid = round((positions - 1) ** 0.5)  # a square grid of patches plus the class token
    config = BlipVisionConfig(
        hidden_size=width, intermediate_size=_need(state, "blocks.0.mlp.fc1.weight", prefix, path).shape[0],
        num_hidden_layers=_count(state, "blocks.{}.norm1.weight"), num_attention_heads=width // HEAD_DIM,
        image_size=grid * patch.shape[-1], patch_size=patch.shape[-1], hidden_act="gelu",
        layer_norm_eps=VIT_LAYER_NORM_EPS)
    vision = BlipVisionModel(config)
    _load(vision, state, VISION_KEYS, prefix, path)
    return vision


def build_text(state: dict[str, Tensor], path: str) -> torch.nn.Module:
    """BLIP's text encoder as a transformers ``BlipTextModel`` with cross-attention, sized from ``state``."""
    from transformers import BlipTextConfig, BlipTextModel

    prefix = "blip.text_encoder."
    words = _need(state, "embeddings.word_embeddings.weight", prefix, path)
    config = BlipTextConfig(
        vocab_size=words.shape[0], hidden_size=words.shape[1],
        encoder_hidden_size=_need(state, "encoder.layer.0.crossattention.self.key.weight", prefix, path).shape[1],
        intermediate_size=_need(state, "encoder.layer.0.intermediate.dense.weight", prefix, path).shape[0],
        num_hidden_layers=_count(state, "encoder.layer.{}.attention.self.query.weight"),
        num_attention_heads=words.shape[1] // HEAD_DIM,
        max_position_embeddings=_need(state, "embeddings.position_embeddings.weight", prefix, path).shape[0],
        hidden_act="gelu", layer_norm_eps=BERT_LAYER_NORM_EPS, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        sep_token_id=None, use_cache=False,
        # transformers builds the cross-attention layers of a decoder only; the forward runs it as an
        # encoder (is_decoder=False: bidirectional self-attention), as BLIP's text encoder is run
        is_decoder=True)
    text = BlipTextModel(config, add_pooling_layer=False)
    state = {k: v for k, v in state.items() if k != "embeddings.position_ids"}  # a buffer, not a weight
    _load(text, state, TEXT_KEYS, prefix, path)
    return text


def build_head(state: dict[str, Tensor], path: str) -> torch.nn.Module:
    """ImageReward's MLP (768-1024-128-64-16-1, dropout between, no activations), keys ``layers.N.*``."""
    for i in IMPROVED_LINEARS:
        _need(state, f"layers.{i}.weight", "mlp.", path)
    widths = [state["layers.0.weight"].shape[1]] + [state[f"layers.{i}.weight"].shape[0] for i in IMPROVED_LINEARS]
    head = ImprovedAestheticMLP(widths)
    try:
        head.load_state_dict(state)
    except RuntimeError:
        raise ValueError(f"ImageReward checkpoint {path!r} has an MLP head of mismatched sizes; "
                         f"{CHECKPOINT_HOW}.") from None
    return head


class ImageRewardScore(Objective):
    """Negative ImageReward score per sample (higher reward = preferred by people, so lower loss).

    ImageReward is BLIP (a ViT-L/16 image tower and a BERT-base text encoder that cross-attends to
    the image's tokens) with an MLP on the text encoder's [CLS] feature, fine-tuned on people's
    rankings of text-to-image outputs; its score is the MLP output normalized as the authors do,
    ``(r - 0.1672) / 1.0333``, so scores are roughly standard (about -2 to 2). The weights are read
    from the released ``ImageReward.pt`` by its key layout (the ``image-reward`` package itself is
    not needed, nor its med_config.json: the sizes are read from the weights) into transformers'
    BLIP modules. Preprocessing is tensor-only and differentiable and follows ImageReward's: grayscale
    to RGB, bicubic resize of the short side to 224 (antialiased) and center crop, CLIP's mean/std.
    The prompt is tokenized with BLIP's BERT tokenizer (``bert-base-uncased`` with BLIP's ``[DEC]``
    and ``[ENC]`` tokens added), padded and truncated to 35 tokens; tokens are cached per prompt.
    The text encoder sees the image, so nothing else is cached. Logs ``image_reward`` per sample.

    Args:
        checkpoint: ``ImageReward.pt`` from the hub repo ``THUDM/ImageReward``.
        tokenizer: BLIP's text tokenizer: ``bert-base-uncased`` (a hub id, fetched first with
            ``hf download bert-base-uncased`` to work offline) or a directory with its vocab.txt.
        prompt: the text to score against; None to read ``batch["prompt"]`` (one string per sample).
        local_files_only: never reach the network (also implied by ``HF_HUB_OFFLINE=1``).
    """

    def __init__(self, checkpoint: str | os.PathLike, tokenizer: str = "bert-base-uncased", prompt: str | None = None,
                 local_files_only: bool | None = None) -> None:
        super().__init__()
        from transformers import BertTokenizer

        state = load_state_dict(checkpoint, "ImageReward checkpoint", CHECKPOINT_HOW)
        path = str(checkpoint)
        self.vision = build_vision(_sub(state, "blip.visual_encoder."), path)
        self.text = build_text(_sub(state, "blip.text_encoder."), path)
        self.head = build_head(_sub(state, "mlp."), path)
        try:
            self.tokenizer = BertTokenizer.from_pretrained(tokenizer, local_files_only=offline(local_files_only))
        except (OSError, ValueError, TypeError) as err:
            raise FileNotFoundError(f"could not load a BERT tokenizer from {tokenizer!r} ({type(err).__name__}); "
                                    f"{TOKENIZER_HOW}.") from None
        # BLIP's init_tokenizer adds these two; they only matter to a prompt that spells them out
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        vocab = self.text.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(f"the tokenizer {tokenizer!r} has {len(self.tokenizer)} tokens but ImageReward's text "
                             f"encoder embeds {vocab}; {TOKENIZER_HOW}.")
        self.size = self.vision.config.image_size
        self.prompt = prompt
        self.eval().requires_grad_(False)
        self._token_cache: dict[str, tuple[Tensor, Tensor]] = {}

    def tokens(self, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask ``(B, 35)`` of ``prompts``, as ImageReward tokenizes them."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._token_cache]
        if missing:
            out = self.tokenizer(missing, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                 return_tensors="pt")
            self._token_cache.update(zip(missing, zip(out.input_ids, out.attention_mask)))
        ids, mask = zip(*(self._token_cache[p] for p in prompts))
        return torch.stack(ids).to(device), torch.stack(mask).to(device)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """The normalized ImageReward ``(B,)`` of images ``(B, C, H, W)`` in [0, 1] for ``prompts``."""
        weight = self.vision.embeddings.patch_embedding.weight
        pixels = normalize(resize_center_crop(as_rgb(images), self.size), CLIP_MEAN, CLIP_STD).to(weight.dtype)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        ids, mask = self.tokens(prompts, weight.device)
        hidden = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_tokens,
                           is_decoder=False).last_hidden_state
        reward = self.head(hidden[:, 0])[:, 0]
        return ((reward - REWARD_MEAN) / REWARD_STD).to(images.dtype)

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        prompts = prompts_for("ImageRewardScore", self.prompt, batch, len(images))
        score = self.score(images, prompts)
        self.terms = {"image_reward": score.detach()}
        return -score
