"""Phase 2 (all-mask prediction) against an independent no-cache reference, and its efficiency contract."""

import pytest
import torch

from conftest import ForceTokens, chat, forced_response, random_image


def generate(model, processor, image, segs=3, **kwargs):
    inputs = chat(processor, image)
    response = forced_response(model, processor, segs=segs)
    out = model.generate_with_masks(
        **inputs,
        max_new_tokens=len(response),
        logits_processor=[ForceTokens(response, inputs["input_ids"].shape[1])],
        **kwargs,
    )
    return inputs, out


def reference_mask_logits(model, inputs, sequence, causal_placeholders=False):
    """STAMP phase 2 written out naively: the whole sequence plus every <|seg|>'s N placeholders in one no-cache
    forward, with the hybrid 4D mask built element by element. Shares nothing with the model's phase-2 code. On
    Qwen3-VL, DeepStack is applied explicitly: each level of the vision tower's deepstack features is added after its
    layer to the image tokens and, with config.deepstack_placeholders, to each block's placeholders (patch j's to
    placeholder j)."""
    config = model.config
    backbone = model.model
    vision = backbone.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    features = torch.cat(vision.pooler_output)
    n = features.shape[0]
    ids = sequence[0]
    length = ids.shape[0]
    embeds = backbone.get_input_embeddings()(ids).clone()
    embeds[ids == config.image_token_id] = features
    types = (ids == config.image_token_id).int()[None]
    text_pos = backbone.get_rope_index(ids[None], types, inputs["image_grid_thw"])[0][:, 0]  # (3, L)
    segs = torch.nonzero(ids == config.seg_token_id).flatten().tolist()
    segs = [s for s in segs if s >= inputs["input_ids"].shape[1]]

    mask_embed = backbone.get_input_embeddings().weight[config.mask_token_id]
    all_embeds, all_pos = [embeds], [text_pos]
    total = length + n * len(segs)
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for i in range(length):
        allowed[i, : i + 1] = True
    for b, s in enumerate(segs):
        all_embeds.append(mask_embed + features)
        all_pos.append((text_pos[0, s] + 1 + torch.arange(n)).expand(3, n))
        start = length + b * n
        for k in range(n):
            allowed[start + k, : s + 1] = True
            if causal_placeholders:
                allowed[start + k, start : start + k + 1] = True
            else:
                allowed[start + k, start : start + n] = True
    x = torch.cat(all_embeds)[None]
    pos = torch.cat(all_pos, 1)[:, None]
    if config.text_config._attn_implementation.endswith("eager"):  # stamp|eager
        mask = torch.zeros(total, total).masked_fill(~allowed, torch.finfo(torch.float32).min)
    else:
        mask = allowed
    mask = mask[None, None]
    deepstack = {}
    if getattr(vision, "deepstack_features", None) is not None:  # Qwen3-VL
        visual = torch.zeros(total, dtype=torch.bool)
        visual[:length] = ids == config.image_token_id
        blocks = len(segs) if config.deepstack_placeholders else 0
        visual[length:] = blocks > 0
        levels = [torch.cat(level) for level in vision.deepstack_features]
        deepstack = {"visual_pos_masks": visual[None], "deepstack_visual_embeds": [level.repeat(1 + blocks, 1) for level in levels]}
    hidden = backbone.language_model(
        inputs_embeds=x, position_ids=pos,
        attention_mask=mask if deepstack else {"full_attention": mask, "sliding_attention": mask}, **deepstack,
    ).last_hidden_state[0]
    logits = model.classifier(hidden[length:]).squeeze(-1)
    return [chunk for chunk in logits.split(n)]


@pytest.mark.parametrize("fixture", ["tiny", "tiny_eager", "tiny_qwen25"])
@pytest.mark.parametrize("segs", [1, 3])
def test_cached_phase2_equals_no_cache_reference(fixture, segs, request):
    model, processor = request.getfixturevalue(fixture)
    image = random_image(90, 150)  # non-square: a 3 x 5 mask grid
    inputs, out = generate(model, processor, image, segs=segs)
    assert len(out.seg_positions[0]) == segs
    grid = processor.mask_grid(inputs["image_grid_thw"][0])
    assert grid == (3, 5)
    reference = reference_mask_logits(model, inputs, out.sequences)
    for got, want in zip(out.mask_logits[0], reference, strict=True):
        assert got.shape == grid
        assert (got.flatten() - want).abs().max().item() <= 1e-5
    if segs == 3:  # the three blocks see different histories, so their masks differ
        assert (out.mask_logits[0][0] - out.mask_logits[0][2]).abs().max() > 1e-4


@pytest.mark.parametrize("fixture", ["tiny", "tiny_eager"])
@pytest.mark.parametrize("segs", [1, 3])
def test_left_padded_batch_equals_the_reference_of_each_sample(fixture, segs, request):
    model, processor = request.getfixturevalue(fixture)
    images = [random_image(60, 60, 1), random_image(84, 140, 2)]  # different grids: the first row is padded
    texts = ["Please segment the cat.", "Segment it"]
    processor.tokenizer.padding_side = "left"
    messages = [
        [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": t}]}]
        for im, t in zip(images, texts)
    ]
    batch = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    assert not batch["attention_mask"].all()
    response = forced_response(model, processor, segs=segs)
    out = model.generate_with_masks(
        **batch, max_new_tokens=len(response), logits_processor=[ForceTokens(response, batch["input_ids"].shape[1])]
    )
    for row, (image, text) in enumerate(zip(images, texts)):
        single = chat(processor, image, text)
        valid = torch.cat([batch["attention_mask"][row], torch.ones(len(response), dtype=torch.long)]).bool()
        reference = reference_mask_logits(model, single, out.sequences[row][valid][None])
        assert len(out.mask_logits[row]) == segs
        for got, want in zip(out.mask_logits[row], reference, strict=True):
            assert (got.flatten() - want).abs().max().item() <= 1e-5


def test_teacher_forced_masks_with_gradients_equal_the_inference_ones(tiny):
    """With autograd on (training), each block gets its own copy of the keys instead of the shared buffer: the
    logits are the same and the gradient reaches the language model through the placeholders' attention."""
    model, processor = tiny
    inputs, out = generate(model, processor, random_image(90, 150))
    teacher = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    teacher["input_ids"] = out.sequences
    teacher["attention_mask"] = torch.ones_like(out.sequences)
    expected = model.predict_masks(**teacher)[0]
    labels = [torch.ones(3, *expected[0].shape)]
    model.zero_grad()
    result = model(**teacher, mask_labels=labels)
    result.mask_loss.backward()
    for got, want in zip(result.mask_logits[0], expected, strict=True):
        torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=0)
    assert model.model.language_model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


@pytest.mark.parametrize("fixture", ["tiny", "tiny_qwen25"])
def test_predict_masks_agrees_with_generate_with_masks(fixture, request):
    model, processor = request.getfixturevalue(fixture)
    image = random_image(120, 64, seed=3)
    inputs, out = generate(model, processor, image)
    teacher = dict(inputs)
    teacher["input_ids"] = out.sequences
    teacher["attention_mask"] = torch.ones_like(out.sequences)
    teacher.pop("mm_token_type_ids")
    predicted = model.predict_masks(**teacher)
    assert len(predicted[0]) == 3
    for got, want in zip(out.mask_logits[0], predicted[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _cache_length(kwargs):
    """Tokens in the cache a language-model call reads: phase 2 passes it in its layout, generate as `cache`."""
    cache = kwargs["stamp_layout"].cache if "stamp_layout" in kwargs else kwargs.get("cache")
    return cache.get_seq_length() if cache is not None else 0


def test_work_counts_vision_once_one_phase2_forward_no_prefix_recompute(tiny):
    model, processor = tiny
    vision_calls, lm_calls = [], []
    hooks = [
        model.model.visual.register_forward_hook(lambda *a: vision_calls.append(1)),
        model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: lm_calls.append(
                (kwargs["inputs_embeds"].shape[1], _cache_length(kwargs), "stamp_layout" in kwargs)
            ),
            with_kwargs=True,
        ),
    ]
    try:
        inputs, out = generate(model, processor, random_image(90, 150))
    finally:
        for hook in hooks:
            hook.remove()
    prompt_len = inputs["input_ids"].shape[1]
    total_len = out.sequences.shape[1]
    n = processor.num_placeholders(inputs["image_grid_thw"][0])
    assert len(vision_calls) == 1
    new_tokens = total_len - prompt_len
    # phase 1: prefill + one call per further token; phase 2: exactly one call for the 3 <|seg|>
    assert len(lm_calls) == 1 + (new_tokens - 1) + 1
    assert [phase2 for _, _, phase2 in lm_calls] == [False] * new_tokens + [True]
    queries, cached_before, _ = lm_calls[-1]
    uncached = total_len - cached_before  # the last token: generate never feeds it back
    assert uncached == 1
    assert queries == uncached + 3 * n  # no token already in the cache is processed again
    assert out.cache.get_seq_length() == total_len  # the last token joined the cache, the placeholders did not


def test_vision_tower_runs_once_for_a_batch_of_images(tiny):
    model, processor = tiny
    calls = []
    hook = model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    processor.tokenizer.padding_side = "left"
    try:
        messages = [
            [{"role": "user", "content": [{"type": "image", "image": random_image(h, w, h)}, {"type": "text", "text": "segment it"}]}]
            for h, w in [(60, 60), (84, 140)]
        ]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
        )
        out = model.generate_with_masks(**inputs, max_new_tokens=3)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert len(out.mask_logits) == 2


@pytest.mark.parametrize("fixture", ["tiny", "tiny_qwen25"])
def test_batched_generation_matches_single_samples(fixture, request):
    model, processor = request.getfixturevalue(fixture)
    images = [random_image(60, 60, 1), random_image(84, 140, 2)]
    singles = []
    for image in images:
        _, out = generate(model, processor, image, segs=2)
        singles.append(out.mask_logits[0])
    processor.tokenizer.padding_side = "left"
    messages = [
        [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "Please segment the cat."}]}]
        for im in images
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    response = forced_response(model, processor, segs=2)
    out = model.generate_with_masks(
        **inputs, max_new_tokens=len(response), logits_processor=[ForceTokens(response, inputs["input_ids"].shape[1])]
    )
    for batched, single in zip(out.mask_logits, singles, strict=True):
        for got, want in zip(batched, single, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _phase2_hook(model, edit):
    """Pre-hook that lets a test edit the inputs of the phase-2 language-model call (the one given a layout)."""

    def hook(module, args, kwargs):
        if "stamp_layout" in kwargs:
            edit(kwargs)
        return args, kwargs

    return model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_placeholders_attend_bidirectionally_within_their_block_only(tiny):
    model, processor = tiny
    image = random_image(90, 150)
    _, base = generate(model, processor, image)

    def perturb_last_placeholder(kwargs):
        embeds = kwargs["inputs_embeds"].clone()
        embeds[:, -1] += 5.0  # placeholder N of the last <|seg|>'s block
        kwargs["inputs_embeds"] = embeds

    hook = _phase2_hook(model, perturb_last_placeholder)
    try:
        _, edited = generate(model, processor, image)
    finally:
        hook.remove()
    first_block_before, last_block_before = base.mask_logits[0][0], base.mask_logits[0][-1]
    first_block_after, last_block_after = edited.mask_logits[0][0], edited.mask_logits[0][-1]
    # placeholder 1 of the same block sees placeholder N ...
    assert (last_block_after.flatten()[0] - last_block_before.flatten()[0]).abs() > 1e-4
    # ... while another <|seg|>'s block does not see it at all
    torch.testing.assert_close(first_block_after, first_block_before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_eager"])
def test_causal_placeholders_equal_the_causal_reference(fixture, request):
    model, processor = request.getfixturevalue(fixture)
    image = random_image(90, 150)
    _, base = generate(model, processor, image)
    model.config.placeholder_attention = "causal"
    try:
        inputs, causal = generate(model, processor, image)
    finally:
        model.config.placeholder_attention = "bidirectional"
    reference = reference_mask_logits(model, inputs, causal.sequences, causal_placeholders=True)
    for bidirectional, one_way, want in zip(base.mask_logits[0], causal.mask_logits[0], reference, strict=True):
        assert (one_way.flatten() - want).abs().max().item() <= 1e-5
        assert (bidirectional - one_way).abs().max() > 1e-4


def test_chunked_phase2_equals_single_forward(tiny):
    model, processor = tiny
    image = random_image(90, 150)
    _, whole = generate(model, processor, image)
    _, chunked = generate(model, processor, image, max_placeholders_per_forward=15)
    assert chunked.cache.get_seq_length() == chunked.sequences.shape[1]
    for a, b in zip(whole.mask_logits[0], chunked.mask_logits[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_response_without_seg_returns_text_and_no_masks(tiny):
    model, processor = tiny
    inputs = chat(processor, random_image(60, 90))
    words = processor.tokenizer.encode(" there is no cat", add_special_tokens=False)
    response = words + [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    out = model.generate_with_masks(
        **inputs, max_new_tokens=len(response), logits_processor=[ForceTokens(response, inputs["input_ids"].shape[1])]
    )
    assert out.seg_positions == [[]]
    assert out.mask_logits == [[]]
    text = processor.decode(out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip() == "there is no cat"


def test_seg_without_image_is_a_clear_error(tiny):
    model, processor = tiny
    inputs = chat(processor, None, "segment something")
    response = [model.config.seg_token_id, processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with pytest.raises(ValueError, match=r"<\|seg\|> at position \d+ of sample 0 has no image"):
        model.generate_with_masks(
            **inputs, max_new_tokens=2, logits_processor=[ForceTokens(response, inputs["input_ids"].shape[1])]
        )


def test_sampling_and_generation_config_pass_through(tiny):
    model, processor = tiny
    from transformers import GenerationConfig

    inputs = chat(processor, random_image(60, 60))
    config = GenerationConfig(max_new_tokens=4, do_sample=True, top_k=5, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    first = model.generate_with_masks(**inputs, generation_config=config, num_return_sequences=2)
    torch.manual_seed(0)
    again = model.generate_with_masks(**inputs, generation_config=config, num_return_sequences=2)
    assert first.sequences.shape == (2, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(first.sequences, again.sequences)
    assert first.cache.get_seq_length() == first.sequences.shape[1]


def test_beam_search_is_refused_with_a_clear_error(tiny):
    model, processor = tiny
    inputs = chat(processor, random_image(60, 60))
    with pytest.raises(ValueError, match="beam search"):
        model.generate_with_masks(**inputs, max_new_tokens=3, num_beams=2)


def test_flash_attention_configured_phase2_runs_block_attention(tiny):
    """A model set up for flash attention (which takes no block layout) still runs phase 2 with block attention:
    the language model's kernel is STAMP's over flash, as set_attn_implementation would name it (flash itself is not
    installed here, so the name is set as that method sets it; phase 2 never calls flash)."""
    from stamp_hf.modeling_stamp import stamp_attention_name

    model, processor = tiny
    inputs, out = generate(model, processor, random_image(90, 150))
    features = list(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    text_config = model.model.language_model.config
    configured = text_config._attn_implementation
    text_config._attn_implementation_internal = stamp_attention_name("flash_attention_2")
    try:
        assert model.configured_attention() == "flash_attention_2"
        again = model.decode_masks(
            out.sequences, out.cache, features, inputs["image_grid_thw"], response_start=inputs["input_ids"].shape[1]
        )
        assert text_config._attn_implementation == "stamp|flash_attention_2"  # nothing switched during the call
    finally:
        text_config._attn_implementation_internal = configured
    for a, b in zip(out.mask_logits[0], again.mask_logits[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert again.cache.get_seq_length() == out.sequences.shape[1]


@pytest.mark.parametrize("fixture", ["tiny", "tiny_eager"])
@pytest.mark.parametrize("segs", [1, 3])
def test_official_procedure_restated_equals_generate_with_masks(fixture, segs, request):
    """The official per-<|seg|> procedure (vision re-run, cache sliced per <|seg|>, one forward of its placeholders),
    as benchmarks/speed.py times it, gives the masks of generate_with_masks and leaves the cache untouched."""
    from stamp_hf.testing.official import official_mask_logits

    model, processor = request.getfixturevalue(fixture)
    inputs, out = generate(model, processor, random_image(90, 150), segs=segs)
    length = out.cache.get_seq_length()
    official = official_mask_logits(
        model, out.sequences, inputs["pixel_values"], inputs["image_grid_thw"], out.cache, inputs["input_ids"].shape[1]
    )
    assert out.cache.get_seq_length() == length
    assert len(official) == segs
    for got, want in zip(out.mask_logits[0], official, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_gradient_checkpointing_recomputes_phase2_with_block_attention():
    """The recomputation during backward runs after phase 2's forward has returned: it must take the block
    attention again (the switch rides on each attention call that carries the layout), and give the same gradients."""
    from stamp_hf.testing import tiny_stamp

    grads = []
    for checkpointing in (False, True):
        model, processor = tiny_stamp(seed=0)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        inputs = chat(processor, random_image(90, 150))
        seg = torch.tensor([[model.config.seg_token_id]])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], seg], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(seg)], 1)
        inputs.pop("mm_token_type_ids")
        model(**inputs, mask_labels=[torch.ones(1, 3, 5)]).loss.backward()
        grads.append(model.model.language_model.layers[0].self_attn.k_proj.weight.grad.clone())
        assert model.configured_attention() == "sdpa"
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_phase2_survives_attention_switches_and_runs_under_inference_mode(tmp_path):
    """The kernel is chosen once, at build or load, and again by set_attn_implementation: after any switch, and with
    `attn_implementation=` at load, phase 2 still equals the no-cache reference; inference_mode gives the same."""
    from transformers import AutoModel

    from stamp_hf.testing import tiny_stamp

    model, processor = tiny_stamp(seed=0)
    image = random_image(90, 150)
    for kernel in ("eager", "sdpa"):
        model.set_attn_implementation(kernel)
        assert model.configured_attention() == kernel
        assert model.model.language_model.config._attn_implementation == f"stamp|{kernel}"
        inputs, out = generate(model, processor, image)
        for got, want in zip(out.mask_logits[0], reference_mask_logits(model, inputs, out.sequences), strict=True):
            assert (got.flatten() - want).abs().max().item() <= 1e-5
    with torch.inference_mode():
        _, again = generate(model, processor, image)
    for got, want in zip(again.mask_logits[0], out.mask_logits[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.configured_attention() == "eager"
    assert "_attn_implementation" not in (tmp_path / "config.json").read_text()  # the routing is not saved
    inputs, out = generate(loaded, processor, image)
    for got, want in zip(out.mask_logits[0], reference_mask_logits(loaded, inputs, out.sequences), strict=True):
        assert (got.flatten() - want).abs().max().item() <= 1e-5


def test_a_kernel_set_on_the_config_directly_is_refused_by_phase2_in_one_line(tiny):
    model, processor = tiny
    text_config = model.model.language_model.config
    configured = text_config._attn_implementation
    text_config._attn_implementation_internal = "sdpa"  # bypassing set_attn_implementation
    try:
        with pytest.raises(ValueError, match="set_attn_implementation"):
            generate(model, processor, random_image(60, 60), segs=1)
    finally:
        text_config._attn_implementation_internal = configured
