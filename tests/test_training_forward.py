"""forward with labels and mask_labels: text_loss_weight * L_text + L_mask (BCE + Dice on the patch grid), gradients
reach the head."""

import pytest
import torch
import torch.nn.functional as F

from conftest import chat, random_image
from stamp_hf.modeling_stamp import mask_target
from stamp_hf.processing_stamp import upsample_mask_logits
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


def test_loss_is_weighted_text_plus_mask_and_parts_are_reported(tiny):
    model, processor = tiny
    batch = teacher_forced_batch(model, processor)
    masks = torch.zeros(2, 90, 150)
    masks[0, :45] = 1
    masks[1, :, 100:] = 1
    out = model(**batch, mask_labels=[masks])
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.text_loss + out.mask_loss)
    model.config.text_loss_weight = 4.0  # weighs L_text only
    try:
        weighted = model(**batch, mask_labels=[masks])
    finally:
        model.config.text_loss_weight = 1.0
    torch.testing.assert_close(weighted.loss, 4.0 * out.text_loss + out.mask_loss)
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
        target = mask_target(mask, logits.shape)
        p = logits.sigmoid()
        dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
        expected.append(F.binary_cross_entropy_with_logits(logits, target) + dice)
    torch.testing.assert_close(out.mask_loss, torch.stack(expected).mean())


def test_mask_target_on_a_known_patch():
    mask = torch.zeros(84, 140)  # a 3 x 5 grid of 28 px cells
    mask[28:56, 56:84] = 1  # exactly cell (1, 2)
    target = mask_target(mask, (3, 5))
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
    fraction = mask_target(mask[0], (3, 5), soft=True)
    assert fraction[0, 0] == pytest.approx(0.5) and fraction[1, 1] == pytest.approx(1 / 3)
    assert mask_target(mask[0], (3, 5))[1, 1] == 0 and mask_target(mask[0], (3, 5))[0, 0] == 1
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
    torch.testing.assert_close(mask_target(fraction, (3, 5)), mask_target(mask[0], (3, 5)))


def _disc(height, width, cy, cx, radius):
    rows, cols = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return (((rows - cy) ** 2 + (cols - cx) ** 2) <= radius**2).float()


def test_image_resolution_loss_scores_the_upsampled_mask_inference_produces(tiny):
    model, processor = tiny
    batch = teacher_forced_batch(model, processor, segs=1)
    mask = _disc(90, 150, 40, 70, 33)[None]  # the label at the original image size, not on the 3 x 5 grid
    model.config.mask_loss_resolution = "image"
    try:
        image = model(**batch, mask_labels=[mask])
        on_grid = model(**batch, mask_labels=[mask_target(mask[0], (3, 5), soft=True)[None]])
        model.config.soft_mask_labels = True
        soft_on_grid = model(**batch, mask_labels=[mask_target(mask[0], (3, 5), soft=True)[None]])
    finally:
        model.config.mask_loss_resolution, model.config.soft_mask_labels = "patch", False
    logits = image.mask_logits[0][0]
    upsampled = processor.post_process_masks  # the loss upsamples exactly as inference does
    pixels = upsample_mask_logits(logits, (90, 150))
    assert torch.equal(pixels > 0, upsampled([[logits]], [(90, 150)], resample="bilinear")[0][0])
    p = pixels.sigmoid()
    dice = 1 - (2 * (p * mask[0]).sum() + 1) / (p.sum() + mask[0].sum() + 1)
    torch.testing.assert_close(image.mask_loss, F.binary_cross_entropy_with_logits(pixels, mask[0]) + dice)
    # a label already on the grid is upsampled by nothing: the patch-resolution loss, thresholded unless soft
    patch = model(**batch, mask_labels=[mask])
    torch.testing.assert_close(on_grid.mask_loss, patch.mask_loss)
    assert not torch.allclose(image.mask_loss, patch.mask_loss)
    model.config.soft_mask_labels = True
    try:
        torch.testing.assert_close(soft_on_grid.mask_loss, model(**batch, mask_labels=[mask]).mask_loss)
    finally:
        model.config.soft_mask_labels = False


def test_the_image_resolution_loss_is_minimised_by_sharper_masks_than_the_patch_loss():
    """What mask_loss_resolution="image" is for: fit free logits on a 6 x 10 grid of 28 px cells to a star and a
    triangle by each loss. The patch loss (with fractions) is minimised by logit(fraction), whose upsampled mask is
    blurred across cells; the image loss is minimised by the logits whose upsampled mask is closest to the shape."""
    from stamp_hf.synthetic.scenes import Shape

    model, processor = tiny_stamp(seed=1)
    for kind, radius in (("star", 70), ("triangle", 60)):
        mask = torch.from_numpy(Shape(kind, "red", "big", 130, 75, radius).rasterize((168, 280))).float()
        scores = {}
        for resolution, soft in (("patch", True), ("image", False)):
            model.config.mask_loss_resolution, model.config.soft_mask_labels = resolution, soft
            logits = torch.zeros(6, 10, requires_grad=True)
            optimizer = torch.optim.Adam([logits], lr=0.1)
            for _ in range(300):
                loss = model.mask_loss([[logits]], [[mask]])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            (predicted,) = processor.post_process_masks([[logits.detach()]], [(168, 280)], resample="bilinear")[0]
            scores[resolution] = float((predicted & mask.bool()).sum() / (predicted | mask.bool()).sum())
        assert scores["image"] > scores["patch"] + 0.05, (kind, scores)


def _two_record_batch(model, processor):
    """Two records of different lengths (right padding), one `<|seg|>` and three, with random masks on their grids."""
    from stamp_hf.data import STAMPCollator, encode_record

    items = []
    for seed, (size, answer) in enumerate((((90, 150), "It is here <|seg|>."),
                                           ((84, 112), "The cat <|seg|>, the dog <|seg|> and the star <|seg|>."))):
        messages = [{"role": "user", "content": "Please segment the animals."}, {"role": "assistant", "content": answer}]
        item = encode_record(processor, random_image(*size, seed=seed), messages)
        segs = answer.count("<|seg|>")
        item["mask_labels"] = torch.rand(segs, *processor.mask_grid(item["image_grid_thw"][0]),
                                         generator=torch.Generator().manual_seed(seed)) > 0.5
        items.append(item)
    return STAMPCollator(processor)(items)


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_the_restated_official_training_step_gives_our_loss_logits_and_gradients(kernel):
    """benchmarks/train_speed.py times our training step against the official one restated (a language-model pass,
    then one mask-pass row per <|seg|> under a dense hybrid 4D mask) and against a plain causal step over as many
    tokens. The restatement computes the same function as ours: same loss, mask logits and gradients; the plain
    step shares our text loss (its appended tokens come after the text) but not our mask logits."""
    from stamp_hf.testing.official import official_training_loss, plain_causal_training_loss

    model, processor = tiny_stamp(seed=2, attn_implementation=kernel)
    model.train()
    batch = _two_record_batch(model, processor)
    assert batch["attention_mask"].float().mean() < 1  # the records differ in length: padding is exercised

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    ours = model(**batch)
    ours_grads = gradients(ours.loss)
    official, official_text, official_masks = official_training_loss(model, batch)
    official_grads = gradients(official)
    torch.testing.assert_close(official, ours.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(official_text, ours.text_loss, atol=1e-5, rtol=1e-5)
    assert [len(row) for row in official_masks] == [len(row) for row in ours.mask_logits] == [1, 3]
    for got, want in zip(sum(official_masks, []), sum(ours.mask_logits, [])):
        assert (got - want).abs().max().item() < 1e-5
    assert official_grads.keys() == ours_grads.keys()
    for name, grad in ours_grads.items():
        torch.testing.assert_close(official_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)

    plain, plain_text, plain_masks = plain_causal_training_loss(model, batch)
    torch.testing.assert_close(plain_text, ours.text_loss, atol=1e-5, rtol=1e-5)
    assert [[m.shape for m in row] for row in plain_masks] == [[m.shape for m in row] for row in ours.mask_logits]
    assert (plain_masks[1][0] - ours.mask_logits[1][0]).abs().max() > 1e-3  # causal over all blocks: other logits
    plain_grads = gradients(plain)
    assert plain_grads.keys() == ours_grads.keys()
