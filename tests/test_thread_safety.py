"""One model shared by many callers: what a web demo with several workers or a threaded server replica does. Every
call on a shared model, run in 2 and 4 threads at once, gives exactly what it gives alone (text bitwise, logits to
1e-5), and a phase-2 call leaves the model's configuration, attributes and hooks as it found them."""

import copy
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import ForceTokens, chat, forced_response
from stamp_hf.conversation import Conversation
from stamp_hf.demo_model import load_demo_model
from stamp_hf.pipeline_stamp import PIPELINE_TASK
from stamp_hf.synthetic.scenes import draw_scene

CALLS_PER_JOB = 3  # each job runs this many times in every threaded round, interleaved with the others


@pytest.fixture(scope="module")
def demo():
    from transformers import pipeline

    model, processor = load_demo_model()
    return model, processor, pipeline(PIPELINE_TASK, model=model, processor=processor)


def scene_image(seed: int):
    return draw_scene(random.Random(seed))[1]


def plain_generate(model, processor, pipe):
    inputs = processor.encode_chat([user(scene_image(1), "Is the star big or small?")])[0]
    return {"sequences": model.generate(**inputs, max_new_tokens=12, do_sample=False)}


def masks_one_seg(model, processor, pipe):
    inputs = processor.encode_chat([user(scene_image(2), "Please segment the red circle.")])[0]
    out = model.generate_with_masks(**inputs, max_new_tokens=16)
    assert len(out.seg_positions[0]) == 1  # the demo model answers with one <|seg|>
    return {"sequences": out.sequences, "mask_logits": out.mask_logits}


def masks_three_segs(model, processor, pipe):
    inputs = chat(processor, scene_image(3), "Please segment the shapes.")
    response = forced_response(model, processor, segs=3)
    out = model.generate_with_masks(
        **inputs, max_new_tokens=len(response), logits_processor=[ForceTokens(response, inputs["input_ids"].shape[1])]
    )
    assert len(out.seg_positions[0]) == 3
    return {"sequences": out.sequences, "mask_logits": out.mask_logits}


def pipeline_batch(model, processor, pipe):
    images = [scene_image(4), scene_image(5).resize((200, 300))]  # different sizes: a left-padded batch
    prompts = ["Please segment the blue triangle.", "Please segment the red circle."]
    results = pipe(images, prompts, batch_size=2, max_new_tokens=16)
    return {"text": [r["text"] for r in results],
            "masks": [np.stack([np.asarray(m["mask"]) for m in r["masks"]]) if r["masks"] else None for r in results],
            "scores": [[m["score"] for m in r["masks"]] for r in results]}


def conversation(model, processor, pipe):
    chat_ = Conversation(model, processor, scene_image(6))
    turns = [chat_.ask(text, max_new_tokens=16) for text in ("Is there a red circle?", "Please segment the red circle.")]
    return {"text": [turn["text"] for turn in turns], "masks": [np.asarray(m["mask"]) for t in turns for m in t["masks"]],
            "sequences": chat_.sequences}


def user(image, text):
    from stamp_hf.processing_stamp import user_turn

    return user_turn([image], text)


JOBS = [plain_generate, masks_one_seg, masks_three_segs, pipeline_batch, conversation]


def assert_same(got, want, where):
    """Token ids, text and masks bitwise; logits and scores to 1e-5."""
    assert got.keys() == want.keys(), where
    for key in want:
        a, b = got[key], want[key]
        if key in ("mask_logits",):
            for row_a, row_b in zip(a, b, strict=True):
                for grid_a, grid_b in zip(row_a, row_b, strict=True):
                    torch.testing.assert_close(grid_a, grid_b, atol=1e-5, rtol=0, msg=f"{where}: {key}")
        elif key == "scores":
            np.testing.assert_allclose(np.array(a, dtype=float), np.array(b, dtype=float), atol=1e-5, rtol=0)
        elif key == "masks":
            for mask_a, mask_b in zip(a, b, strict=True):
                assert (mask_a is None) == (mask_b is None) and (mask_a is None or np.array_equal(mask_a, mask_b)), where
        elif isinstance(b, torch.Tensor):
            assert torch.equal(a, b), f"{where}: {key}"
        else:
            assert a == b, f"{where}: {key}"


@pytest.fixture(scope="module")
def serial(demo):
    return {job.__name__: job(*demo) for job in JOBS}


@pytest.mark.parametrize("threads", [2, 4])
def test_concurrent_calls_on_one_model_give_the_serial_results(demo, serial, threads):
    calls = [job for _ in range(CALLS_PER_JOB) for job in JOBS]  # interleaved: every kind of call meets every other
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda job: (job.__name__, job(*demo)), calls))
    assert len(results) == len(JOBS) * CALLS_PER_JOB
    for name, result in results:
        assert_same(result, serial[name], f"{name} in {threads} threads")


def model_state(model) -> dict:
    """Everything a call could flip: the configuration (with every sub-config's attention kernel), each module's
    plain attributes and its hooks."""
    configs = [model.config, *(getattr(model.config, key) for key in model.config.sub_configs)]
    state = {"config": model.config.to_dict(), "kernels": [c._attn_implementation for c in configs]}
    for name, module in model.named_modules():
        plain = {k: v for k, v in vars(module).items() if not k.startswith("_") and not isinstance(v, torch.Tensor)}
        hooks = [len(getattr(module, h)) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")]
        state[name] = (copy.deepcopy(plain), hooks, sorted(vars(module)))
    return state


def test_a_phase_2_call_changes_nothing_in_the_model(demo):
    model, processor, _ = demo
    before = model_state(model)
    masks_three_segs(model, processor, None)
    conversation(model, processor, None)
    after = model_state(model)
    assert after == before
    assert model.model.rope_deltas is None  # no rope offset kept between calls
    assert all(not layer.self_attn._forward_pre_hooks for layer in model.model.language_model.layers)
