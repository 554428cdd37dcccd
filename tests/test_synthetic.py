"""The synthetic referring-segmentation generator: reproducible, exact masks, truthful language, disjoint splits."""

import collections
import json
import re

import numpy as np
import pytest

from stamp_hf.synthetic import COLOURS, SHAPES, Shape, make_sample, split_seeds, unique_descriptions, write_split

SEEDS = range(40)


def test_same_seed_gives_identical_images_masks_and_texts():
    for seed in SEEDS:
        a, b = make_sample(seed), make_sample(seed)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.messages == b.messages and a.shapes == b.shapes
        assert len(a.masks) == len(b.masks)
        for x, y in zip(a.masks, b.masks):
            assert (x is None and y is None) or np.array_equal(x, y)


def test_different_seeds_give_different_samples():
    images = {make_sample(seed).image.tobytes() for seed in SEEDS}
    assert len(images) == len(SEEDS)


def test_written_splits_are_byte_identical_across_runs(tmp_path):
    first = write_split(tmp_path / "a", "val", 12)
    second = write_split(tmp_path / "b", "val", 12)
    assert first.read_bytes() == second.read_bytes()
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert files and files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_each_mask_is_exactly_the_pixels_of_its_drawn_shape():
    for seed in SEEDS:
        sample = make_sample(seed)
        pixels = np.asarray(sample.image)
        for shape, mask in zip(sample.shapes, sample.object_masks):
            # the shape rasterised alone is its mask, pixel for pixel (nothing occluded, nothing added)
            assert np.array_equal(shape.rasterize(mask.shape), mask)
            assert mask.sum() > 100  # a real shape, not a speck
        # in the scene, the pixels of each colour are exactly the union of the masks of that colour's shapes:
        # no anti-aliasing, nothing hidden by overlap, no background pixel of a shape colour
        for colour, rgb in COLOURS.items():
            union = np.zeros(pixels.shape[:2], dtype=bool)
            for shape, mask in zip(sample.shapes, sample.object_masks):
                if shape.colour == colour:
                    union |= mask
            assert np.array_equal(np.all(pixels == rgb, -1), union), (seed, colour)
        total = np.sum(sample.object_masks, axis=0)
        assert total.max() <= 1  # shapes never overlap


def test_target_masks_are_unions_of_whole_shapes():
    for seed in range(200):
        sample = make_sample(seed)
        assert len(sample.masks) == sum(m["content"].count("<|seg|>") for m in sample.messages if m["role"] == "assistant")
        for mask in sample.masks:
            if mask is None:
                assert sample.task == "none"
                continue
            inside = [np.array_equal(mask & m, m) for m in sample.object_masks]
            outside = [not (mask & m).any() for m in sample.object_masks]
            assert all(i or o for i, o in zip(inside, outside)) and any(inside)
            assert np.array_equal(mask, np.any([m for m, i in zip(sample.object_masks, inside) if i], axis=0))


def test_every_task_occurs_with_its_answer_shape():
    tasks = collections.Counter()
    for seed in range(300):
        sample = make_sample(seed)
        tasks[sample.task] += 1
        answers = [m["content"] for m in sample.messages if m["role"] == "assistant"]
        if sample.task == "vqa":
            assert sample.masks == [] and "<|seg|>" not in answers[0]
        elif sample.task == "none":
            assert answers == [answers[0]] and answers[0].startswith("Sorry, there is no") and sample.masks == [None]
        elif sample.task == "two_turn":
            assert len(sample.messages) == 4 and "<|seg|>" not in answers[0] and "<|seg|>" in answers[1]
        else:
            assert answers[-1] in ("Sure, it is <|seg|>.", "Sure, they are <|seg|>.")
    assert set(tasks) == {"refer", "multi", "none", "vqa", "two_turn"}


def test_referring_phrases_pick_out_exactly_their_target():
    red_circle = Shape("circle", "red", "small", 30, 60, 14)
    blue_circle = Shape("circle", "blue", "big", 90, 60, 25)
    red_star = Shape("star", "red", "big", 100, 110, 15)
    scene = [red_circle, blue_circle, red_star]
    assert set(unique_descriptions(scene, 0)) >= {
        "the red circle", "the small circle", "the leftmost circle", "the leftmost shape", "the shape left of the blue circle",
    }
    assert "the red shape" not in unique_descriptions(scene, 0)  # two red shapes
    assert "the circle" not in unique_descriptions(scene, 1)  # two circles
    assert "the star" in unique_descriptions(scene, 2) and "the bottommost shape" in unique_descriptions(scene, 2)
    # a phrase is only offered when no other shape fits it
    for seed in range(100):
        sample = make_sample(seed, task="refer")
        phrase = sample.messages[0]["content"]
        target = [i for i, m in enumerate(sample.object_masks) if np.array_equal(m, sample.masks[0])]
        assert len(target) == 1
        shape = sample.shapes[target[0]]
        named = [w for w in re.findall(r"\w+", re.split(r" (?:of|above|below) ", phrase)[0]) if w in COLOURS or w in SHAPES]
        assert all(w in (shape.colour, shape.kind) for w in named), (phrase, shape)


def test_vqa_answers_are_true():
    checked = 0
    for seed in range(300):
        sample = make_sample(seed, task="vqa")
        question, answer = sample.messages[0]["content"], sample.messages[1]["content"]
        count = re.fullmatch(r"How many (\w+ )?(\w+)s are there\?", question)
        if count is None:
            continue
        qualifier, noun = (count.group(1) or "").strip(), count.group(2)
        true = sum(
            (noun == "shape" or s.kind == noun) and qualifier in ("", s.colour, s.size) for s in sample.shapes
        )
        words = ("no", "one", "two", "three", "four", "five")
        assert re.search(rf"\b{words[true]}\b", answer), (question, answer, sample.shapes)
        checked += 1
    assert checked > 50


def test_splits_use_disjoint_seeds_and_files_are_never_overwritten(tmp_path):
    seeds = {split: set(split_seeds(split, 10**6)) for split in ("train", "val", "test")}
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"] and not seeds["val"] & seeds["test"]
    path = write_split(tmp_path, "test", 3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["seed"] for r in records] == list(split_seeds("test", 3))
    for record in records:
        assert (tmp_path / record["image"]).is_file()
        for mask in record["masks"]:
            assert mask == {"empty": True} or (tmp_path / mask["png"]).is_file()
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="test.jsonl already exists"):
        write_split(tmp_path, "test", 3)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        split_seeds("dev", 3)
