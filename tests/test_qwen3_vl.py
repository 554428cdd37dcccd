"""STAMP on Qwen3-VL (dense and MoE): the one phase 2 with DeepStack, against the no-cache reference with DeepStack
applied explicitly, for `deepstack_placeholders` on and off; batches, follow-up turns, and one model shared by
threads."""

import functools
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import ForceTokens, chat, forced_response, random_image
from stamp_hf.conversation import Conversation
from stamp_hf.testing import answer_with_masks, tiny_stamp
from test_phase2 import reference_mask_logits
from test_thread_safety import assert_same, model_state

MODELS = {  # name -> tiny_stamp arguments
    "qwen3": dict(backbone="qwen3_vl"),
    "qwen3_no_deepstack": dict(backbone="qwen3_vl", deepstack_placeholders=False),
    "qwen3_eager": dict(backbone="qwen3_vl", attn_implementation="eager"),
    "qwen3_moe": dict(backbone="qwen3_vl_moe"),
    "qwen3_moe_no_deepstack": dict(backbone="qwen3_vl_moe", deepstack_placeholders=False),
}
_built = {}


def tiny_qwen3(name):
    if name not in _built:
        _built[name] = tiny_stamp(seed=0, **MODELS[name])
    return _built[name]


def forced(model, processor, inputs, segs):
    response = forced_response(model, processor, segs=segs)
    return model.generate_with_masks(
        **inputs, max_new_tokens=len(response), logits_processor=[ForceTokens(response, inputs["input_ids"].shape[1])]
    )


def teacher_forced(inputs, sequences):
    teacher = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    pad = sequences.shape[1] - inputs["input_ids"].shape[1]
    teacher["input_ids"] = sequences
    teacher["attention_mask"] = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(len(sequences), pad)], 1)
    return teacher


def max_difference(got, want) -> float:
    return max((a.flatten() - b.flatten()).abs().max().item() for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("name", list(MODELS))
def test_generate_with_masks_equals_predict_masks_and_the_reference(name):
    model, processor = tiny_qwen3(name)
    assert processor.patch_factor(processor.image_processor) == 32  # 16 px patches merged 2 x 2
    inputs = chat(processor, random_image(96, 160))  # a 3 x 5 grid of 32 px cells
    out = forced(model, processor, inputs, segs=2)
    assert [tuple(grid.shape) for grid in out.mask_logits[0]] == [(3, 5), (3, 5)]
    reference = reference_mask_logits(model, inputs, out.sequences)
    assert max_difference(out.mask_logits[0], reference) <= 1e-5
    assert max_difference(model.predict_masks(**teacher_forced(inputs, out.sequences))[0], reference) <= 1e-5
    assert (out.mask_logits[0][0] - out.mask_logits[0][1]).abs().max() > 1e-4  # two histories, two masks


@pytest.mark.parametrize("backbone", ["qwen3", "qwen3_moe"])
def test_deepstack_placeholders_changes_the_masks_only_through_the_placeholders(backbone):
    """Same weights, same text: the switch only decides whether the placeholders receive DeepStack."""
    (on, processor), (off, _) = tiny_qwen3(backbone), tiny_qwen3(f"{backbone}_no_deepstack")
    inputs = chat(processor, random_image(96, 160))
    with_deepstack, without = forced(on, processor, inputs, segs=2), forced(off, processor, inputs, segs=2)
    assert torch.equal(with_deepstack.sequences, without.sequences)
    assert max_difference(with_deepstack.mask_logits[0], without.mask_logits[0]) > 1e-4


def test_left_padded_batch_and_teacher_forcing_equal_the_reference_of_each_sample():
    model, processor = tiny_qwen3("qwen3")
    images = [random_image(64, 64, 1), random_image(96, 160, 2)]  # 2 x 2 and 3 x 5 grids: the first row is padded
    processor.tokenizer.padding_side = "left"
    messages = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
                for image, text in zip(images, ["Please segment the cat.", "Segment it"])]
    batch = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all()
    out = forced(model, processor, batch, segs=2)
    taught = model.predict_masks(**teacher_forced(batch, out.sequences))
    for row, image in enumerate(images):
        valid = torch.cat([batch["attention_mask"][row], torch.ones(out.sequences.shape[1] - batch["input_ids"].shape[1],
                                                                    dtype=torch.long)]).bool()
        reference = reference_mask_logits(model, chat(processor, image), out.sequences[row][valid][None])
        assert max_difference(out.mask_logits[row], reference) <= 1e-5
        assert max_difference(taught[row], reference) <= 1e-5


def test_follow_up_turn_on_the_cache_equals_the_reference():
    """Turn 2 runs on turn 1's cache with the kept features (merged + DeepStack), not the image again."""
    model, processor = tiny_qwen3("qwen3")
    inputs = chat(processor, random_image(96, 160))
    features = model.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
    assert features[0].shape == (1 + len(model.config.vision_config.deepstack_visual_indexes), 15, 64)
    first = forced(model, processor, inputs, segs=1)
    follow = processor.tokenizer.encode("<|im_start|>user\nAnd again?<|im_end|>\n<|im_start|>assistant\n",
                                        add_special_tokens=False)
    ids = torch.cat([first.sequences, torch.tensor([follow])], 1)
    types = torch.zeros_like(ids)
    types[ids == model.config.image_token_id] = 1
    continued = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_grid_thw": inputs["image_grid_thw"],
                 "mm_token_type_ids": types}
    response = forced_response(model, processor, segs=2)
    second = model.generate_with_masks(**continued, image_features=features, cache=first.cache,
                                       max_new_tokens=len(response), logits_processor=[ForceTokens(response, ids.shape[1])])
    reference = reference_mask_logits(model, {**inputs, "input_ids": ids}, second.sequences)
    assert max_difference(second.mask_logits[0], reference) <= 1e-5
    with pytest.raises(ValueError, match="DeepStack"):  # merged features alone would silently drop DeepStack
        model.generate_with_masks(**continued, image_features=[features[0][0]], cache=second.cache, max_new_tokens=1)


# ---------------------------------------------------------------------- one model, many threads (as test_thread_safety)

@pytest.fixture(scope="module")
def shared():
    model, processor = tiny_stamp(seed=1, backbone="qwen3_vl")
    answer_with_masks(model, processor, segs=1)  # a saved-config way to make it segment without a logits processor
    return model, processor


def plain_generate(model, processor):
    inputs = chat(processor, random_image(64, 96, 3), "Is the star big?")
    return {"sequences": model.generate(**inputs, max_new_tokens=6, do_sample=False)}


def masks_one_seg(model, processor):
    out = model.generate_with_masks(**chat(processor, random_image(96, 160, 4)), max_new_tokens=8)
    return {"sequences": out.sequences, "mask_logits": out.mask_logits}


def masks_three_segs(model, processor):
    out = forced(model, processor, chat(processor, random_image(64, 128, 5)), segs=3)
    return {"sequences": out.sequences, "mask_logits": out.mask_logits}


def conversation(model, processor):
    chat_ = Conversation(model, processor, random_image(96, 96, 6))
    turns = [chat_.ask(text, max_new_tokens=8) for text in ("Is there a circle?", "Please segment it.")]
    return {"text": [turn["text"] for turn in turns], "sequences": chat_.sequences}


JOBS = [plain_generate, masks_one_seg, masks_three_segs, conversation]


def state(model) -> dict:
    """test_thread_safety's model_state, with Qwen3-VL's activation partials (equal only to themselves, and copied
    there) compared by what they call."""
    def comparable(value):
        return (value.func, value.args, value.keywords) if isinstance(value, functools.partial) else value

    return {name: (({k: comparable(v) for k, v in entry[0].items()}, *entry[1:]) if isinstance(entry, tuple) else entry)
            for name, entry in model_state(model).items()}


def test_concurrent_calls_on_one_qwen3_model_give_the_serial_results(shared):
    model, processor = shared
    before = state(model)
    serial = {job.__name__: job(model, processor) for job in JOBS}
    assert len(serial["masks_one_seg"]["mask_logits"][0]) == 1
    calls = [job for _ in range(3) for job in JOBS]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: (job.__name__, job(model, processor)), calls))
    for name, result in results:
        assert_same(result, serial[name], f"{name} in 4 threads")
    assert state(model) == before
    assert model.model.rope_deltas is None
