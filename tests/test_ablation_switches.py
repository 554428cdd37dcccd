"""The two STAMPConfig switches behind the paper's Table 6 ablations: causal placeholders and no patch-feature fusion."""

import pytest
import torch

from stamp_hf import STAMPConfig
from stamp_hf.testing import tiny_stamp, tiny_tokenizer, tiny_config

from conftest import chat, random_image


def _phase2_inputs(model, inputs, perturb_from=None):
    """Mask logits, and the inputs_embeds and phase-2 layout the language model gets in the teacher-forced phase-2
    forward; with `perturb_from` = k, noise is added to the embeddings of placeholders k, k+1, ... on the way in."""
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()
        seen["layout"] = kwargs["stamp_layout"]
        if perturb_from is not None:
            num_placeholders = int(inputs["image_grid_thw"][0].prod()) // model.config.vision_config.spatial_merge_size**2
            embeds = kwargs["inputs_embeds"].clone()
            tail = num_placeholders - perturb_from
            embeds[:, -tail:] += torch.randn(embeds[:, -tail:].shape, generator=torch.Generator().manual_seed(0))
            return args, dict(kwargs, inputs_embeds=embeds)

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        (logits,), = model.predict_masks(**inputs)
    finally:
        handle.remove()
    return logits.flatten(), seen


def _seg_inputs(model, processor):
    inputs = chat(processor, random_image(64, 84), "Please segment the cat.")
    seg = torch.tensor([[model.config.seg_token_id]])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], seg], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(seg)], 1)
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(seg)], 1)
    return inputs


def test_defaults_are_the_papers_design():
    config = tiny_config(tiny_tokenizer())
    assert config.placeholder_attention == "bidirectional" and config.fuse_patch_features is True
    with pytest.raises(ValueError, match="placeholder_attention must be 'bidirectional' or 'causal', got 'sideways'"):
        STAMPConfig(placeholder_attention="sideways")
    assert config.mask_loss_resolution == "patch" and config.soft_mask_labels is False  # the paper's loss
    with pytest.raises(ValueError, match=r"mask_loss_resolution must be one of \('patch', 'image'\), got 'pixels'"):
        STAMPConfig(mask_loss_resolution="pixels")


def test_causal_placeholders_see_only_earlier_placeholders():
    model, processor = tiny_stamp(seed=0)
    inputs = _seg_inputs(model, processor)
    bidirectional, seen_bi = _phase2_inputs(model, inputs)
    model.config.placeholder_attention = "causal"
    causal, seen_causal = _phase2_inputs(model, inputs)
    n = bidirectional.numel()
    assert not seen_bi["layout"].causal_placeholders and seen_causal["layout"].causal_placeholders
    # one block of n placeholders that sees the whole sequence (it ends with the <|seg|>) in both modes
    for seen in (seen_bi, seen_causal):
        (block,) = seen["layout"].blocks
        assert (block.start, block.size, block.prefix) == (0, n, inputs["input_ids"].shape[1])
    # perturbing the second half of the placeholders changes earlier logits only when attention is bidirectional
    half = n // 2
    for mode, expect_unchanged in (("causal", True), ("bidirectional", False)):
        model.config.placeholder_attention = mode
        original, _ = _phase2_inputs(model, inputs)
        perturbed, _ = _phase2_inputs(model, inputs, perturb_from=n - half)
        assert not torch.allclose(perturbed[-half:], original[-half:], atol=1e-4)
        assert torch.allclose(perturbed[:-half], original[:-half], atol=1e-6) == expect_unchanged, mode


def test_without_fusion_placeholders_are_the_mask_embedding_alone():
    model, processor = tiny_stamp(seed=0)
    inputs = _seg_inputs(model, processor)
    fused, seen_fused = _phase2_inputs(model, inputs)
    model.config.fuse_patch_features = False
    plain, seen_plain = _phase2_inputs(model, inputs)
    n = fused.numel()
    mask_embed = model.get_input_embeddings().weight[model.config.mask_token_id]
    torch.testing.assert_close(seen_plain["embeds"][0, -n:], mask_embed.expand(n, -1))
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    torch.testing.assert_close(seen_fused["embeds"][0, -n:], mask_embed + features.pooler_output[0])
    assert torch.equal(seen_fused["embeds"][0, :-n], seen_plain["embeds"][0, :-n])
    assert not torch.allclose(fused, plain, atol=1e-4)
