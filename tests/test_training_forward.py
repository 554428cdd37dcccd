"""forward with labels and mask_labels: L_text + L_mask (BCE + Dice on the patch grid), gradients reach the head."""

import pytest
import torch
import torch.nn.functional as F

from conftest import chat, random_image
from stamp_hf.modeling_stamp import patch_grid_target
from stamp_hf.testing import tiny_stamp


def teacher_forced_batch(model, processor, segs=2, image=(90, 150)):
    inputs = chat(processor, random_image(*image))
    tokenizer = processor.tokenizer
    answer = []
    for _ in range(segs):
        answer += tokenizer.encode(" here", add_special_tokens=False) + [model.config.seg_token_id]
    answer += [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    input_ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], 1)
    labels = torch.full_like(input_ids, -100)
    labels[0, -len(answer) :] = torch.tensor(answer)
    types = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(answer), dtype=torch.long)], 1)
    return dict(inputs, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, mm_token_type_ids=types)


def test_loss_is_text_plus_mask_and_parts_are_reported(tiny):
    model, processor = tiny
    batch = teacher_forced_batch(model, processor)
    masks = torch.zeros(2, 90, 150)
    masks[0, :45] = 1
    masks[1, :, 100:] = 1
    out = model(**batch, mask_labels=[masks])
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.text_loss + out.mask_loss)
    plain = model(**batch)  # Qwen2-VL's own path: the same text loss
    torch.testing.assert_close(out.text_loss, plain.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=1e-5)
    # the mask logits are those predict_masks gives
    predicted = model.predict_masks(**batch, mask_labels=[masks])  # a training batch, passed whole
    for got, want in zip(out.mask_logits[0], predicted[0]):
        torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['attention_masks'\]"):  # a typo is not ignored
        model.predict_masks(**batch, attention_masks=batch["attention_mask"])
    # and the loss is BCE + Dice on the patch grid, recomputed here by hand
    expected = []
    for logits, mask in zip(out.mask_logits[0], masks):
        target = patch_grid_target(mask, logits.shape)
        p = logits.sigmoid()
        dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
        expected.append(F.binary_cross_entropy_with_logits(logits, target) + dice)
    torch.testing.assert_close(out.mask_loss, torch.stack(expected).mean())


def test_patch_grid_target_on_a_known_patch():
    mask = torch.zeros(84, 140)  # a 3 x 5 grid of 28 px cells
    mask[28:56, 56:84] = 1  # exactly cell (1, 2)
    target = patch_grid_target(mask, (3, 5))
    expected = torch.zeros(3, 5)
    expected[1, 2] = 1
    assert torch.equal(target, expected)


def test_gradients_reach_classifier_and_backbone_and_a_step_lowers_the_loss():
    model, processor = tiny_stamp(seed=1)
    model.train()
    batch = teacher_forced_batch(model, processor)
    masks = torch.zeros(2, 90, 150)
    masks[:, 30:60, 50:100] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        out = model(**batch, mask_labels=[masks])
        optimizer.zero_grad()
        out.loss.backward()
        assert model.classifier.weight.grad.abs().sum() > 0
        assert model.model.visual.merger.mlp[0].weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(out.mask_loss.item())
    assert losses[-1] < losses[0]


def test_mismatched_mask_labels_are_a_clear_error(tiny):
    model, processor = tiny
    batch = teacher_forced_batch(model, processor, segs=2)
    with pytest.raises(ValueError, match="sample 0 has 2 <\\|seg\\|> tokens but 1 mask labels"):
        model(**batch, mask_labels=[torch.zeros(1, 90, 150)])
    with pytest.raises(ValueError, match="2D"):
        model(**batch, mask_labels=[[torch.zeros(3, 90, 150), torch.zeros(90, 150)]])


def test_soft_mask_labels_train_on_each_cells_foreground_fraction(tiny):
    model, processor = tiny
    batch = teacher_forced_batch(model, processor, segs=1)
    mask = torch.zeros(1, 90, 150)  # a 3 x 5 grid of 30 px cells after the processor's resize
    mask[0, :15, :30] = 1  # half of cell (0, 0): 1 once thresholded (>= 0.5)
    mask[0, 30:40, 30:60] = 1  # a third of cell (1, 1)
    fraction = patch_grid_target(mask[0], (3, 5), soft=True)
    assert fraction[0, 0] == pytest.approx(0.5) and fraction[1, 1] == pytest.approx(1 / 3)
    assert patch_grid_target(mask[0], (3, 5))[1, 1] == 0 and patch_grid_target(mask[0], (3, 5))[0, 0] == 1
    binary = model(**batch, mask_labels=[mask])
    model.config.soft_mask_labels = True
    try:
        soft = model(**batch, mask_labels=[mask])
    finally:
        model.config.soft_mask_labels = False
    logits = soft.mask_logits[0][0]
    p = logits.sigmoid()
    dice = 1 - (2 * (p * fraction).sum() + 1) / (p.sum() + fraction.sum() + 1)
    torch.testing.assert_close(soft.mask_loss, F.binary_cross_entropy_with_logits(logits, fraction) + dice)
    assert not torch.allclose(soft.mask_loss, binary.mask_loss)
    # the training dataset hands the model fractions on the grid: thresholding them there gives the binary targets
    torch.testing.assert_close(patch_grid_target(fraction, (3, 5)), patch_grid_target(mask[0], (3, 5)))
