"""The synthetic referring-segmentation generator: reproducible, exact masks, truthful language, no wording shortcut,
disjoint splits, and exports in the public formats `stamp-hf prepare-data` reads."""

import collections
import json
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from stamp_hf.synthetic.scenes import (
    FORMS,
    IMAGE_SIZES,
    Reference,
    Shape,
    find_reference,
    make_sample,
    question,
    split_seeds,
    unique_descriptions,
    write_dialogue_export,
    write_refer_export,
    write_split,
)

SEEDS = range(40)


def test_same_seed_gives_identical_images_masks_and_texts():
    for seed in SEEDS:
        a, b = make_sample(seed), make_sample(seed)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.messages == b.messages and a.shapes == b.shapes and a.form == b.form
        for x, y in zip(a.masks, b.masks):
            assert (x is None and y is None) or np.array_equal(x, y)


def test_samples_are_the_same_in_every_process():
    """A seed means the same sample whatever Python's string-hash seed is (the absent targets were once drawn from
    a set, whose order changes between processes)."""
    code = ("import json; from stamp_hf.synthetic.scenes import make_sample, split_seeds; "
            "print(json.dumps([[make_sample(s).messages, make_sample(s).form] for s in split_seeds('test', 150)]))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)]
    assert runs[0] == runs[1] and len(json.loads(runs[0])) == 150
    assert {form for _, form in json.loads(runs[0])} >= set(FORMS)  # every request form was drawn


def test_images_come_in_every_size_and_shapes_scale_with_them():
    sizes = collections.Counter(make_sample(seed).image.size for seed in range(300))
    assert set(sizes) == set(IMAGE_SIZES)
    for seed in SEEDS:
        sample = make_sample(seed)
        width, height = sample.image.size
        scale = (width * height) ** 0.5 / 128
        for shape, mask in zip(sample.shapes, sample.object_masks):
            assert 12 * scale <= shape.radius <= 30 * scale
            assert np.array_equal(shape.rasterize(mask.shape), mask)  # the mask is the shape, pixel for pixel
        assert np.sum(sample.object_masks, axis=0).max() <= 1  # shapes never overlap


def test_each_mask_is_exactly_the_pixels_painted_in_a_shade_of_its_colour():
    for seed in SEEDS:
        sample = make_sample(seed)
        pixels = np.asarray(sample.image).astype(int)
        every = np.any(sample.object_masks, axis=0)
        assert pixels[~every].min() >= 170  # the pale background
        for mask in sample.object_masks:
            shade = pixels[mask]
            assert (shade == shade[0]).all() and shade[0].min() < 130  # one saturated shade per shape


def test_target_masks_are_unions_of_the_shapes_the_reference_picks_out():
    for seed in range(200):
        sample = make_sample(seed)
        assert len(sample.masks) == sum(m["content"].count("<|seg|>") for m in sample.messages if m["role"] == "assistant")
        for mask in sample.masks:
            if mask is None:
                assert sample.task == "none" or sample.form == "count"
                continue
            inside = [np.array_equal(mask & m, m) for m in sample.object_masks]
            outside = [not (mask & m).any() for m in sample.object_masks]
            assert all(i or o for i, o in zip(inside, outside)) and any(inside)


def test_absent_targets_are_asked_and_answered_exactly_like_present_ones():
    """No wording shortcut: every request form occurs for present and for absent targets, and the answers to both
    are the same words; only the mask tells them apart."""
    forms, answers = collections.defaultdict(set), collections.defaultdict(set)
    for seed in range(1500):
        sample = make_sample(seed)
        if sample.task in ("refer", "none"):
            forms[sample.task].add(sample.form)
            answers[sample.task].add(sample.messages[1]["content"])
            assert (sample.masks[0] is None) == (sample.task == "none")
    assert forms["refer"] == forms["none"] == set(FORMS)
    assert answers["refer"] == answers["none"] == {"Sure, it is <|seg|>.", "Sure, they are <|seg|>."}


def test_requests_vary_in_case_article_punctuation_and_synonyms():
    texts = [make_sample(seed, task="refer").messages[0]["content"] for seed in range(800)]
    assert any(t.isupper() for t in texts) and any(t == t.lower() for t in texts)
    assert any(not t.endswith((".", "?")) for t in texts) and any(t.endswith((".", "?")) for t in texts)
    for words in (("biggest", "largest"), ("leftmost", "on the left"), ("all the", "every"), ("big", "large")):
        for word in words:
            assert any(word in t.lower() for t in texts), word
    assert any(re.match(r"(please )?segment (?!the |all |every )\w", t.lower()) for t in texts)  # no article


def test_references_pick_out_exactly_their_targets():
    frame = (128, 128)
    red_circle = Shape("circle", "red", "small", 30, 60, 14)
    blue_circle = Shape("circle", "blue", "big", 90, 60, 25)
    red_star = Shape("star", "red", "big", 100, 110, 15)
    scene = [red_circle, blue_circle, red_star]
    assert Reference("colour+kind", kind="circle", colour="red").members(scene, frame) == [0]
    assert Reference("kind", kind="circle").members(scene, frame) is None  # two circles: ambiguous, never asked
    assert Reference("kind", kind="square").members(scene, frame) == []  # absent
    assert Reference("position", kind="circle", extreme="left").members(scene, frame) == [0]
    assert Reference("superlative", extreme="biggest").members(scene, frame) == [1]
    assert Reference("all", colour="red", many=True).members(scene, frame) == [0, 2]
    anchor = Reference("colour+kind", kind="circle", colour="blue")
    assert Reference("relation", relation="left of", anchor=anchor).members(scene, frame) == [0]
    assert Reference("relation", relation="below", anchor=anchor).members(scene, frame) == [2]
    names = {r.phrase(random.Random(0)) for r in unique_descriptions(scene, 0, frame)}
    assert "the red circle" in names and names & {"the small circle", "the little circle"}
    assert not any("blue" in n or "star" in n for n in names if " of " not in n and "above" not in n)
    rng = random.Random(1)
    for form in FORMS:
        found = find_reference(rng, scene, frame, form, present=False)
        assert found is None or found[1] == []


def test_questions_are_true_and_never_name_what_they_ask():
    checked = collections.Counter()
    for seed in range(400):
        sample = make_sample(seed, task="vqa")
        text, answer = sample.messages[0]["content"], sample.messages[1]["content"]
        checked[sample.form] += 1
        count = re.fullmatch(r"How many (\w+ )?(\w+)s are there\?", text)
        if count:
            qualifier, noun = (count.group(1) or "").strip(), count.group(2)
            true = sum((noun == "shape" or s.kind == noun) and qualifier in ("", s.colour) for s in sample.shapes)
            assert re.search(rf"\b{('no', 'one', 'two', 'three', 'four', 'five')[true]}\b", answer), (text, answer)
        colour = re.fullmatch(r"What colou?r is (.*)\?", text)
        if colour:
            assert answer.split()[-1].rstrip(".") not in colour.group(1), (text, answer)
        kind = re.fullmatch(r"What shape is (.*)\?", text)
        if kind:
            assert answer.split()[-1].rstrip(".") not in kind.group(1), (text, answer)
    assert set(checked) == {"count", "colour", "kind", "size", "position", "exists", "describe"}
    rng = random.Random(0)
    scene = [Shape("circle", "red", "small", 30, 60, 14), Shape("star", "blue", "big", 90, 60, 25)]
    assert question(rng, scene, (128, 128), "describe")[2] == (
        "There are two shapes: a small red circle and a big blue star.")


def test_splits_use_disjoint_seeds_and_files_are_never_overwritten(tmp_path):
    seeds = {split: set(split_seeds(split, 10**6)) for split in ("train", "val", "test")}
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"] and not seeds["val"] & seeds["test"]
    path = write_split(tmp_path, "test", 6)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["seed"] for r in records] == list(split_seeds("test", 6))
    for record in records:
        assert (tmp_path / record["image"]).is_file() and (tmp_path / record["all_shapes"]).is_file()
        assert record["form"] is not None
        for mask in record["masks"]:
            assert mask == {"empty": True} or (tmp_path / mask["png"]).is_file()
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="test.jsonl already exists"):
        write_split(tmp_path, "test", 3)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        split_seeds("dev", 3)


def test_exports_are_read_by_prepare_data_as_grefcoco_and_llava(tmp_path):
    """The gRefCOCO export goes through `stamp-hf prepare-data` with the paper's templates, absent references with an
    empty mask; the LLaVA export becomes multi-turn records without masks."""
    from stamp_hf.data import read_records
    from stamp_hf.prepare import prepare_data
    from stamp_hf.prompts import RES_QUESTIONS

    refer = write_refer_export(tmp_path / "refer", 12)
    result = prepare_data(refer, tmp_path / "refer.jsonl", split="train", images=refer / "images")
    assert result["format"] == "grefcoco" and result["records"] >= 30
    records = read_records(tmp_path / "refer.jsonl")
    empty = [r for r in records if r.masks == [{"empty": True}]]
    assert 0 < len(empty) < len(records)
    templates = [re.escape(t).replace(r"\{\}", ".+") for t in RES_QUESTIONS]
    for record in records:
        assert any(re.fullmatch(t, record.messages[0]["content"]) for t in templates)
        if record.masks != [{"empty": True}]:
            assert record.load_masks(record.load_image().size)[0].any()
    dialogue = write_dialogue_export(tmp_path / "dialogue.json", 5)
    result = prepare_data(dialogue, tmp_path / "dialogue.jsonl", images=tmp_path / "dialogue_images")
    assert result["format"] == "llava" and result["records"] == 5
    for record in read_records(tmp_path / "dialogue.jsonl"):
        assert len(record.messages) == 6 and not record.masks and "<image>" not in record.messages[0]["content"]
