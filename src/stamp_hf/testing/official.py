"""Other ways to get STAMP's masks, restated on a STAMP model, to check and time phase 2 against (tests/test_phase2.py,
benchmarks/speed.py). Reference procedures, not an inference path: nothing in the package calls them.

- `official_mask_logits`: the official inference procedure (segment_predictor_cache.py of HKUST-LongGroup/STAMP): for
  each `<|seg|>`, the vision tower runs again, the key/value cache is sliced (copied) to the prefix through that
  `<|seg|>`, and one forward of its N placeholders (bidirectional among themselves, seeing the whole prefix) gives its
  logits. Same weights, same positions, so its logits equal `generate_with_masks`' (tests/test_phase2.py checks it).
- `autoregressive_mask_decoding`: the next-token paradigm's cost (Text4Seg-style): N tokens generated one by one on the
  cache after a `<|seg|>`, each a language-model step plus the vocabulary head and an argmax.
- `plain_forward`: the ideal a mask pass is held to, one plain language-model forward of N tokens on a cached prefix.

All three work on one row with one image, float weights in any dtype; none uses phase 2's code.
"""

import torch
from transformers.cache_utils import DynamicCache


def _text_positions(model, sequences, image_grid_thw) -> torch.Tensor:
    """(3, 1, L) M-RoPE positions of the sequence, as the model computes them."""
    types = (sequences == model.config.image_token_id).int()
    return model.model.get_rope_index(sequences, types, image_grid_thw, None, torch.ones_like(sequences))[0]


def _sliced_cache(cache, length: int) -> DynamicCache:
    """A copy of the first `length` tokens of every layer's keys/values (the official code slices per `<|seg|>`)."""
    sliced = DynamicCache()
    for index, layer in enumerate(cache.layers):
        sliced.update(layer.keys[:, :, :length].clone(), layer.values[:, :, :length].clone(), index)
    return sliced


def _full_attention_mask(model, queries: int, keys: int, like: torch.Tensor):
    """Every query sees every key (the official or-mask for one `<|seg|>`): boolean for sdpa, additive for eager."""
    allowed = torch.ones(1, 1, queries, keys, dtype=torch.bool, device=like.device)
    if model.configured_attention() == "eager":
        return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device)
    return allowed


@torch.no_grad()
def official_mask_logits(model, sequences, pixel_values, image_grid_thw, cache, response_start: int):
    """The (h, w) mask logits of every `<|seg|>` at index >= response_start, the official way. `cache` covers (a
    prefix of) `sequences` up to at least the last `<|seg|>`, and is left untouched."""
    positions = _text_positions(model, sequences, image_grid_thw)
    seg_indices = torch.nonzero(sequences[0, response_start:] == model.config.seg_token_id).flatten() + response_start
    merge = model.config.vision_config.spatial_merge_size
    grid = (int(image_grid_thw[-1, 1]) // merge, int(image_grid_thw[-1, 2]) // merge)
    mask_embed = model.get_input_embeddings().weight[model.config.mask_token_id]
    masks = []
    for index in seg_indices.tolist():
        vision = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        features = vision.pooler_output[-1]
        prefix = _sliced_cache(cache, index + 1)
        n = features.shape[0]
        embeds = (mask_embed + features.to(mask_embed.dtype))[None]
        placeholder_positions = (positions[0, 0, index] + 1 + torch.arange(n, device=embeds.device)).expand(3, 1, n)
        attention = _full_attention_mask(model, n, index + 1 + n, embeds)
        hidden = model.model.language_model(
            inputs_embeds=embeds,
            position_ids=placeholder_positions,
            **_deepstack_inputs(model, vision, attention, n),
            cache=prefix,
            use_cache=True,
        ).last_hidden_state
        masks.append(model.classifier(hidden[0]).squeeze(-1).reshape(grid))
    return masks


def _deepstack_inputs(model, vision, attention, n: int) -> dict:
    """The mask (and, on Qwen3-VL with config.deepstack_placeholders, every placeholder's DeepStack features: its
    patch's, as the official procedure would give them on that backbone) for a forward of N placeholders."""
    deepstack = getattr(vision, "deepstack_features", None)
    if deepstack is None:  # Qwen2-VL's text models take the mask per layer type
        return {"attention_mask": {"full_attention": attention, "sliding_attention": attention}}
    inputs = {"attention_mask": attention}  # Qwen3-VL's takes a 4D mask as given
    if model.config.deepstack_placeholders:
        inputs.update(visual_pos_masks=torch.ones(1, n, dtype=torch.bool, device=attention.device),
                      deepstack_visual_embeds=[level[-1] for level in deepstack])
    return inputs


@torch.no_grad()
def autoregressive_mask_decoding(model, cache, start_token: int, start_position: int, n: int) -> torch.Tensor:
    """N tokens greedily generated one by one on `cache` (each step: embed, language model, vocabulary head, argmax),
    positions continuing from `start_position`; the cache is cropped back afterwards. Returns the N token ids."""
    token = torch.tensor([[start_token]], device=model.device)
    tokens = []
    for step in range(n):
        position = torch.full((3, 1, 1), start_position + step, device=model.device)
        hidden = model.model.language_model(
            inputs_embeds=model.get_input_embeddings()(token), position_ids=position, cache=cache, use_cache=True
        ).last_hidden_state
        token = model.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)
        tokens.append(token)
    cache.crop(-n)
    return torch.cat(tokens, 1)


@torch.no_grad()
def plain_forward(model, cache, embeds: torch.Tensor, start_position: int) -> torch.Tensor:
    """One causal language-model forward of `embeds` (1, N, hidden) on `cache`, cropped back afterwards."""
    n = embeds.shape[1]
    positions = (start_position + torch.arange(n, device=embeds.device)).expand(3, 1, n)
    hidden = model.model.language_model(
        inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True
    ).last_hidden_state
    cache.crop(-n)
    return hidden
