"""Other ways to get STAMP's masks, and other training steps, restated on a STAMP model, to check and time phase 2 and
the training forward against (tests/test_phase2.py, tests/test_training_forward.py, benchmarks/speed.py,
benchmarks/train_speed.py). Reference procedures, not an inference or training path: nothing in the package calls them.

- `official_mask_logits`: the official inference procedure (segment_predictor_cache.py of HKUST-LongGroup/STAMP): for
  each `<|seg|>`, the vision tower runs again, the key/value cache is sliced (copied) to the prefix through that
  `<|seg|>`, and one forward of its N placeholders (bidirectional among themselves, seeing the whole prefix) gives its
  logits. Same weights, same positions, so its logits equal `generate_with_masks`' (tests/test_phase2.py checks it).
- `autoregressive_mask_decoding`: the next-token paradigm's cost (Text4Seg-style): N tokens generated one by one on the
  cache after a `<|seg|>`, each a language-model step plus the vocabulary head and an argmax.
- `plain_forward`: the ideal a mask pass is held to, one plain language-model forward of N tokens on a cached prefix.

- `official_training_loss`: the official training step (train/seg_trainer.py): a language-model pass over the batch,
  then one mask-pass row per `<|seg|>` (its prefix + N `<|mask|>` tokens, the image encoded again) under a dense
  hybrid 4D mask. Its loss, mask logits and gradients equal those of `model(..., mask_labels=...)`.
- `plain_causal_training_loss`: the ideal a training step is held to, one plain causal fine-tuning forward over as
  many tokens (each record's tokens, then N tokens per `<|seg|>`), with the same heads and losses.

The inference references work on one row with one image, the training ones on batches with one image per record;
float weights in any dtype; none uses phase 2's code.
"""

import torch
from torch.nn.utils.rnn import pad_sequence
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
    """Every query sees every key (the official or-mask for one `<|seg|>`)."""
    return _kernel_mask(model, torch.ones(1, 1, queries, keys, dtype=torch.bool, device=like.device), like)


def _kernel_mask(model, allowed: torch.Tensor, like: torch.Tensor):
    """A boolean mask as the configured kernel takes it: as it is for sdpa, additive for eager."""
    if model.configured_attention() == "eager":
        return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(~allowed, torch.finfo(like.dtype).min)
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


# ---------------------------------------------------------------------- training steps


def _record_images(model, batch) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
    """(pixel rows, grid_thw, mask grid) of each record's one image, in batch order."""
    merge = model.config.vision_config.spatial_merge_size
    images, start = [], 0
    for grid in batch["image_grid_thw"]:
        rows = int(grid.prod())
        images.append((batch["pixel_values"][start : start + rows], grid, (int(grid[1]) // merge, int(grid[2]) // merge)))
        start += rows
    if start != batch["pixel_values"].shape[0] or len(images) != batch["input_ids"].shape[0]:
        raise ValueError("the training restatements take batches with exactly one image per record")
    return images


def _seg_indices(model, input_ids) -> list[list[int]]:
    return [torch.nonzero(row == model.config.seg_token_id).flatten().tolist() for row in input_ids]


def official_training_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
    """
    The official training step's loss (SegmentationSFTTrainer.compute_loss, train/seg_trainer.py of
    HKUST-LongGroup/STAMP) restated on a STAMP model, for a collated batch (input_ids, attention_mask, labels,
    mm_token_type_ids, pixel_values, image_grid_thw, mask_labels; right padding). Returns (loss, text_loss,
    mask_logits as `model(..., mask_labels=...)` gives them).

    1. The language-model pass: the backbone's own forward of the batch with its labels (the vision tower once; no
       cache, as under the official recipe's gradient checkpointing).
    2. The mask pass: one new row per `<|seg|>` of every record: the record's tokens through that `<|seg|>`, then N
       `<|mask|>` tokens (train/utils.py append_after_segment_torch), right-padded into one batch; the record's image
       encoded again for each row; the `<|mask|>` embeddings plus their patch's feature; the backbone's rope
       positions (1-D text positions after `<|seg|>`); and a dense (rows, 1, L, L) hybrid mask, causal except that
       `<|mask|>` queries see every non-pad key: what create_causal_mask builds with the official or_mask_function
       for sdpa. (The official runs flash_attention_2, which ignores that mask and stays causal; this restates the
       mask it builds, whose logits equal STAMP's bidirectional placeholders.)
    3. loss = text_loss + mask loss. The mask loss is `model.mask_loss` (the model's BCE / Dice weights; the official
       code fixes 0.3 / 0.7), so the two steps' losses compare; its cost is the same either way.
    """
    text_loss = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"], labels=batch["labels"],
        use_cache=False,
    ).loss
    images = _record_images(model, batch)
    mask_id, rows, valid, pixels, grids, owners = model.config.mask_token_id, [], [], [], [], []
    for record, indices in enumerate(_seg_indices(model, batch["input_ids"])):
        record_pixels, grid, (height, width) = images[record]
        for index in indices:
            prefix = batch["input_ids"][record, : index + 1]
            rows.append(torch.cat([prefix, prefix.new_full((height * width,), mask_id)]))
            valid.append(torch.cat([batch["attention_mask"][record, : index + 1], prefix.new_ones(height * width)]))
            pixels.append(record_pixels)
            grids.append(grid)
            owners.append(record)
    mask_logits = [[] for _ in images]
    if rows:
        # pads are never seen (masked keys, unread queries): any token id does
        ids = pad_sequence(rows, batch_first=True, padding_value=0)
        key_valid = pad_sequence(valid, batch_first=True, padding_value=0).bool()
        grid_thw = torch.stack(grids)
        features = torch.cat(model.model.get_image_features(torch.cat(pixels), grid_thw, return_dict=True).pooler_output)
        embeds = model.get_input_embeddings()(ids)
        image_tokens, placeholders = ids == model.config.image_token_id, ids == mask_id
        embeds = embeds.masked_scatter(image_tokens[..., None], features.to(embeds.dtype))
        embeds = embeds.masked_scatter(placeholders[..., None], embeds[placeholders] + features.to(embeds.dtype))
        positions = model.model.get_rope_index(ids, image_tokens.long(), grid_thw, None, key_valid.long())[0]
        length = ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        hybrid = _kernel_mask(model, ((causal[None] | placeholders[:, :, None]) & key_valid[:, None, :])[:, None], embeds)
        hidden = model.model.language_model(
            inputs_embeds=embeds, position_ids=positions, use_cache=False,
            attention_mask={"full_attention": hybrid, "sliding_attention": hybrid},
        ).last_hidden_state
        logits = model.classifier(hidden).squeeze(-1)
        for row, record in enumerate(owners):
            mask_logits[record].append(logits[row][placeholders[row]].reshape(images[record][2]))
    mask_loss = model.mask_loss(mask_logits, batch["mask_labels"])
    return text_loss + mask_loss, text_loss, mask_logits


def plain_causal_training_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
    """
    The ideal a STAMP training step is held to: a plain causal fine-tuning step over as many tokens. Each record's
    tokens are followed by N `<|mask|>` tokens per `<|seg|>` and the backbone runs its own forward once (the vision
    tower once, its own causal mask and positions, no STAMP attention); the vocabulary head and the text loss take
    the record's tokens, the classifier and `model.mask_loss` the appended ones, N per `<|seg|>` in order. The heads
    and losses are STAMP's, so only the attention layout differs. Returns (loss, text_loss, mask_logits); its text
    loss equals STAMP's (the appended tokens come after the text), its mask logits do not (they see each other
    causally, not block by block).
    """
    images = _record_images(model, batch)
    counts = [len(indices) for indices in _seg_indices(model, batch["input_ids"])]
    extra = [count * height * width for count, (_, _, (height, width)) in zip(counts, images, strict=True)]
    device = batch["input_ids"].device
    appended = torch.arange(max(extra, default=0), device=device)[None] < torch.tensor(extra, device=device)[:, None]
    ids = torch.cat([batch["input_ids"], torch.full(appended.shape, model.config.mask_token_id, device=device)], 1)
    attention_mask = torch.cat([batch["attention_mask"], appended.to(batch["attention_mask"].dtype)], 1)
    types = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(batch["mm_token_type_ids"][:, :1]).expand_as(appended)], 1)
    hidden = model.model(
        input_ids=ids, attention_mask=attention_mask, pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=types, use_cache=False,
    ).last_hidden_state
    text_len = batch["input_ids"].shape[1]
    text_loss = model.loss_function(
        logits=model.lm_head(hidden[:, :text_len]), labels=batch["labels"], vocab_size=model.config.text_config.vocab_size
    )
    patch_logits = model.classifier(hidden[:, text_len:]).squeeze(-1)
    mask_logits = []
    for record, (count, (_, _, grid)) in enumerate(zip(counts, images, strict=True)):
        size = grid[0] * grid[1]
        mask_logits.append([patch_logits[record, k * size : (k + 1) * size].reshape(grid) for k in range(count)])
    mask_loss = model.mask_loss(mask_logits, batch["mask_labels"])
    return model.config.text_loss_weight * text_loss + mask_loss, text_loss, mask_logits
