"""Lower-precision inference: bfloat16 weights, and int8 weight-only quantization of the language model through
transformers' TorchAoConfig (skipped without torchao, the `quant` extra). Each still gives generate_with_masks ==
predict_masks within the tolerance benchmarks/precision.py states, and masks of the float32 model's shape."""

import pytest
import torch
from transformers import AutoModel

from conftest import ForceTokens, chat, forced_response, random_image

TOLERANCES = {"bfloat16": 0.25, "int8": 1e-4}  # as benchmarks/precision.py STAMP_TOLERANCES


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl"])
def tiny(request):
    """A tiny STAMP of each backbone: Qwen2-VL, and Qwen3-VL (DeepStack placeholders on)."""
    from stamp_hf.testing import tiny_stamp

    return tiny_stamp(seed=0, backbone=request.param)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    model, processor = tiny
    folder = tmp_path_factory.mktemp("tiny_stamp")
    model.save_pretrained(folder)
    return folder


def masks_and_teacher_forced(model, processor):
    inputs = chat(processor, random_image(90, 150))
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    response = forced_response(model, processor, segs=2)
    out = model.generate_with_masks(
        **inputs, max_new_tokens=len(response), logits_processor=[ForceTokens(response, inputs["input_ids"].shape[1])]
    )
    teacher = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    teacher["input_ids"] = out.sequences
    teacher["attention_mask"] = torch.ones_like(out.sequences)
    return out, model.predict_masks(**teacher)


def check_against_teacher_forced(model, processor, tolerance, reference):
    out, predicted = masks_and_teacher_forced(model, processor)
    assert len(out.mask_logits[0]) == 2
    for got, want, full in zip(out.mask_logits[0], predicted[0], reference.mask_logits[0], strict=True):
        assert got.shape == want.shape == full.shape
        assert (got.float() - want.float()).abs().max().item() <= tolerance
    assert processor.post_process_masks(out, [(90, 150)])[0][0].shape == (90, 150)


def test_bfloat16_inference_runs_and_matches_teacher_forcing(tiny, saved):
    _, processor = tiny
    model = AutoModel.from_pretrained(saved, dtype=torch.bfloat16).eval()
    assert model.model.language_model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    reference, _ = masks_and_teacher_forced(tiny[0], processor)
    check_against_teacher_forced(model, processor, TOLERANCES["bfloat16"], reference)


def test_int8_language_model_runs_and_matches_teacher_forcing(tiny, saved):
    pytest.importorskip("torchao")
    from stamp_hf.quantization import int8_language_model_config

    _, processor = tiny
    model = AutoModel.from_pretrained(saved, quantization_config=int8_language_model_config()).eval()
    layer = model.model.language_model.layers[0]
    assert "Int8" in type(layer.mlp.up_proj.weight).__name__ and "Int8" in type(layer.self_attn.q_proj.weight).__name__
    vision = next(m.weight for m in model.model.visual.modules() if isinstance(m, torch.nn.Linear))
    for kept in (vision, model.classifier.weight, model.lm_head.weight):
        assert type(kept) is torch.nn.Parameter and kept.dtype == torch.float32
    reference, _ = masks_and_teacher_forced(tiny[0], processor)
    check_against_teacher_forced(model, processor, TOLERANCES["int8"], reference)
