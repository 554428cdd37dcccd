"""STAMP and Qwen-VL models from scratch, offline: a Qwen2-style byte-level BPE tokenizer learned on a corpus, and
configs of Qwen2-VL / Qwen2.5-VL / Qwen3-VL structure at any size, with or without STAMP's fields. The tests' tiny models
(stamp_hf.testing, at toy size) and the bundled demo model (stamp_hf.synthetic.stages, at its own size) start here.
"""

import json
from dataclasses import fields

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from .configuration_stamp import STAMP_CONFIGS, STAMPConfig, STAMPConfigMixin
from .vocab import add_stamp_tokens

# Qwen2-VL's special tokens, in its id order (151643-151656 in the real vocabulary).
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def bpe_tokenizer(corpus, vocab_size: int, stamp_tokens: bool = True) -> Qwen2Tokenizer:
    """A Qwen2-style byte-level BPE tokenizer: Qwen2-VL's special tokens after a vocabulary of `vocab_size` learned on
    `corpus` (texts), then the four STAMP tokens (unless `stamp_tokens=False`: a base model's tokenizer), in the same
    order as the real Qwen2-VL / STAMP vocabularies."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=bpe.get_vocab(), merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_VL_SPECIAL_TOKENS], special_tokens=True)
    if stamp_tokens:
        add_stamp_tokens(tokenizer)
    return tokenizer


def stamp_config(
    tokenizer,
    hidden_size: int,
    num_layers: int,
    vision_depth: int,
    vision_embed_dim: int,
    patch_size: int | None,
    merge_size: int,
    backbone: str = "qwen2_vl",
    **overrides,
) -> STAMPConfig:
    """A STAMP config with the structure of `backbone` ("qwen2_vl": STAMPConfig, "qwen2_5_vl": STAMPQwen2_5_VLConfig,
    with window attention in all but the last vision block; "qwen3_vl" / "qwen3_vl_moe": STAMPQwen3VLConfig /
    STAMPQwen3VLMoeConfig, interleaved M-RoPE, DeepStack from every vision block) at the given size (`patch_size`
    None: the backbone's, 14 px or Qwen3-VL's 16 px); token ids read from `tokenizer` (the STAMP ones when it has the
    STAMP tokens). `overrides`: any other config setting."""
    ids = tokenizer.convert_tokens_to_ids
    qwen3 = backbone.startswith("qwen3")
    patch_size = patch_size or (16 if qwen3 else 14)
    half_head = hidden_size // 4 // 2  # M-RoPE splits half the head dim 1/4, 3/8, 3/8 (t, h, w), as Qwen2-VL does
    mrope_section = [half_head // 4, 3 * half_head // 8, half_head - half_head // 4 - 3 * half_head // 8]
    settings = dict(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section,
                             **({"mrope_interleaved": True} if qwen3 else {})},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
            **_text_extras(backbone, hidden_size),
        ),
        vision_config=_vision_config(backbone, vision_depth, vision_embed_dim, hidden_size, patch_size, merge_size),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    settings.update(overrides)
    config = STAMP_CONFIGS[backbone](**settings)
    if "<|seg|>" in tokenizer.get_vocab():
        config.set_stamp_token_ids(tokenizer)
    return config


def _text_extras(backbone, hidden_size) -> dict:
    if not backbone.startswith("qwen3"):
        return {}
    extras = {"head_dim": hidden_size // 4}  # Qwen3 sets the head width explicitly (128 by default)
    if backbone == "qwen3_vl_moe":  # 4 experts, 2 per token, in every layer
        extras.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=3 * hidden_size // 4,
                      decoder_sparse_step=1)
    return extras


def _vision_config(backbone, depth, width, out_size, patch_size, merge_size) -> dict:
    if backbone.startswith("qwen3"):  # DeepStack taps every block: `depth` levels, added after the first LM layers
        return dict(depth=depth, hidden_size=width, out_hidden_size=out_size, intermediate_size=2 * width, num_heads=2,
                    patch_size=patch_size, spatial_merge_size=merge_size, num_position_embeddings=64,
                    deepstack_visual_indexes=list(range(depth)))
    if backbone == "qwen2_vl":
        return dict(depth=depth, embed_dim=width, hidden_size=out_size, num_heads=2, mlp_ratio=2, patch_size=patch_size,
                    spatial_merge_size=merge_size)
    # Qwen2.5-VL names the ViT width hidden_size and the merger's output out_hidden_size; windows of 2 x 2 merged
    # patches, so the tiny images of the tests span several windows
    return dict(depth=depth, hidden_size=width, out_hidden_size=out_size, intermediate_size=2 * width, num_heads=2,
                patch_size=patch_size, spatial_merge_size=merge_size, window_size=2 * patch_size * merge_size,
                fullatt_block_indexes=[depth - 1], tokens_per_second=2)


def base_config(tokenizer, backbone: str = "qwen2_vl", vocab_rows: int | None = None, **settings):
    """The plain Qwen-VL config (transformers' own `qwen2_vl` / `qwen2_5_vl`, no STAMP field: what a base such as
    Qwen/Qwen2-VL-2B-Instruct carries) of `stamp_config(tokenizer, backbone=backbone, **settings)`. `vocab_rows`:
    embedding rows (default: one per token)."""
    from transformers import AutoConfig

    stamp = stamp_config(tokenizer, backbone=backbone, **settings)
    stamp_fields = {f.name for f in fields(STAMPConfigMixin)} | {"deepstack_placeholders"}
    plain = {k: v for k, v in stamp.to_dict().items() if k not in stamp_fields}
    if vocab_rows is not None:
        plain["text_config"]["vocab_size"] = vocab_rows
    for key in ("model_type", "auto_map", "architectures", "transformers_version"):
        plain.pop(key, None)
    return AutoConfig.for_model(backbone, **plain)


__all__ = ["QWEN2_VL_SPECIAL_TOKENS", "base_config", "bpe_tokenizer", "stamp_config"]
