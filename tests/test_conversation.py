"""Multi-turn chat on one cache: a later turn runs only its own tokens, the image is encoded once, and the result
equals running the whole conversation from scratch."""

import numpy as np
import pytest
import torch

from conftest import chat, random_image
from stamp_hf.conversation import Conversation
from stamp_hf.testing import answer_with_masks, tiny_stamp


@pytest.mark.parametrize("backbone", ["qwen2_vl", "qwen2_5_vl"])
def test_follow_up_runs_only_new_tokens_and_matches_a_fresh_run(backbone):
    model, processor = tiny_stamp(seed=2, backbone=backbone)
    answer_with_masks(model, processor, segs=1)
    image = random_image(60, 90, seed=1)
    conversation = Conversation(model, processor, image)

    text_lengths, vision_calls = [], []
    hooks = [
        model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: text_lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
        ),
        model.model.visual.register_forward_hook(lambda *args: vision_calls.append(1)),
    ]
    first = conversation.ask("Please segment the cat.", max_new_tokens=8)
    assert first["text"] == " it is<|seg|>" and len(first["masks"]) == 1
    assert first["masks"][0]["mask"].size == (90, 60)
    after_turn_1 = conversation.sequences.shape[1]
    assert vision_calls == [1]

    # something else runs on the model in between (it leaves its own M-RoPE deltas behind)
    model.generate_with_masks(**chat(processor, random_image(150, 50, seed=3)), max_new_tokens=3)
    text_lengths.clear()
    vision_calls.clear()

    second = conversation.ask("Now the <|seg|> one on its left.", max_new_tokens=8)
    for hook in hooks:
        hook.remove()
    sequence = conversation.sequences
    response_length = 4  # " it is" (2 tokens), <|seg|>, <|im_end|>
    new_tokens = sequence.shape[1] - after_turn_1 - response_length
    assert text_lengths[0] == new_tokens  # the first forward of turn 2 covers only the follow-up's own tokens
    assert new_tokens < after_turn_1
    assert vision_calls == []  # the image is not encoded again
    # the typed control token in the follow-up stayed text; the only new <|seg|> is the answer's
    follow_up = sequence[0, after_turn_1 : after_turn_1 + new_tokens]
    assert model.config.seg_token_id not in follow_up.tolist()
    assert processor.tokenizer.decode(follow_up).startswith("\n<|im_start|>user\nNow the <|seg|> one")
    assert len(second["masks"]) == 1 and second["masks"][0]["mask"].size == (90, 60)
    assert [m["role"] for m in conversation.history] == ["user", "assistant", "user", "assistant"]

    # from scratch on the same tokens: same answer, and the same mask from teacher forcing over the whole chat
    prompt = sequence[:, : sequence.shape[1] - response_length]
    inputs = chat(processor, image, "Please segment the cat.")
    fresh = model.generate_with_masks(
        input_ids=prompt, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], max_new_tokens=8
    )
    assert torch.equal(fresh.sequences, sequence)
    reference = model.predict_masks(input_ids=sequence, pixel_values=inputs["pixel_values"],
                                    image_grid_thw=inputs["image_grid_thw"])[0]
    (mask,) = processor.post_process_masks([[reference[-1]]], [(60, 90)])[0]
    assert torch.equal(torch.from_numpy(np.asarray(second["masks"][0]["mask"]) > 127), mask)
    assert (fresh.mask_logits[0][0] - reference[-1]).abs().max() < 1e-5
