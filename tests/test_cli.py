"""The real `stamp-hf` console script in a subprocess against a tiny saved model."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import random_image
from stamp_hf.overlay import PALETTE
from stamp_hf.testing import answer_with_masks, tiny_sam, tiny_stamp

SCRIPT = Path(sys.executable).parent / "stamp-hf"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    model, processor = tiny_stamp(seed=1)
    answer_with_masks(model, processor, segs=1)
    model.save_pretrained(folder / "tiny")
    processor.save_pretrained(folder / "tiny")
    image = random_image(50, 150, seed=11)
    image.save(folder / "image.png")
    (folder / "broken.png").write_bytes(b"not an image")
    sam, sam_processor = tiny_sam()
    sam.save_pretrained(folder / "sam")
    sam_processor.save_pretrained(folder / "sam")
    return folder


def stamp_hf(*args, cwd, stdin=None):
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, input=stdin, timeout=300)


def test_segment_writes_mask_overlay_and_json(workdir):
    result = stamp_hf("segment", "image.png", "Please segment the cat.", "--model", "tiny", "--out", "mask.png",
                      "--overlay", "overlay.png", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["text"] == " it is<|seg|>" and report["size"] == [150, 50]
    (entry,) = report["masks"]
    assert entry["file"] == "mask.png" and entry["label"] == "it is"
    mask = np.asarray(Image.open(workdir / "mask.png")) > 127
    assert mask.shape == (50, 150) and entry["area"] == int(mask.sum())
    assert "loaded tiny" in result.stderr and "answered in" in result.stderr  # progress on stderr

    overlay = np.asarray(Image.open(workdir / "overlay.png").convert("RGB")).astype(int)
    original = np.asarray(Image.open(workdir / "image.png").convert("RGB")).astype(int)
    assert 0 < mask.sum() < mask.size, "the tiny model's mask should be neither empty nor full"
    colour = np.array(PALETTE[0])
    assert (overlay[~mask] == original[~mask]).all()  # outside: the original pixels
    inside = overlay[mask]
    # inside: tinted towards the mask colour (blend) or the colour itself (outline), never the original
    assert (np.abs(inside - (original[mask] + colour) / 2) <= 1).all(1).sum() + (inside == colour).all(1).sum() == mask.sum()
    assert (inside == colour).all(1).any()  # the outline


def test_existing_files_are_not_overwritten_without_force(workdir):
    (workdir / "keep.png").write_bytes(b"mine")
    result = stamp_hf("segment", "image.png", "x", "--model", "tiny", "--overlay", "keep.png", cwd=workdir)
    assert result.returncode == 2 and "keep.png exists; pass --force" in result.stderr
    assert (workdir / "keep.png").read_bytes() == b"mine"
    result = stamp_hf("segment", "image.png", "x", "--model", "tiny", "--overlay", "keep.png", "--force", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert Image.open(workdir / "keep.png").size == (150, 50)


@pytest.mark.parametrize("image, message", [("missing.png", "missing.png: no such image file"),
                                            ("broken.png", "broken.png: cannot read it as an image")])
def test_bad_images_give_one_line_errors(workdir, image, message):
    result = stamp_hf("segment", image, "x", "--model", "tiny", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"stamp-hf segment: error: {message}" + result.stderr.split(message)[1].rstrip()]
    assert "Traceback" not in result.stderr


def test_missing_model_gives_a_one_line_error(workdir):
    result = stamp_hf("segment", "image.png", "x", "--model", "no-such-folder/at-all", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("stamp-hf segment: error:")


def test_chat_keeps_the_conversation(workdir):
    shutil.rmtree(workdir / "turns", ignore_errors=True)
    result = stamp_hf("chat", "image.png", "--model", "tiny", "--overlay-dir", "turns", cwd=workdir,
                      stdin="Please segment the cat.\nAnd again?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(" it is<|seg|>") == 2
    assert "turn 1:" in result.stderr and "turn 2:" in result.stderr
    assert sorted(p.name for p in (workdir / "turns").iterdir()) == ["turn_1.png", "turn_2.png"]


def test_segment_with_sam_refinement(workdir):
    coarse = stamp_hf("segment", "image.png", "x", "--model", "tiny", "--out", "coarse.png", "--force", cwd=workdir)
    refined = stamp_hf("segment", "image.png", "x", "--model", "tiny", "--out", "refined.png", "--force",
                       "--refine-sam", "sam", cwd=workdir)
    assert coarse.returncode == 0 and refined.returncode == 0, refined.stderr
    coarse_mask, refined_mask = (np.asarray(Image.open(workdir / name)) > 127 for name in ("coarse.png", "refined.png"))
    assert refined_mask.shape == coarse_mask.shape == (50, 150)
    assert not np.array_equal(refined_mask, coarse_mask)
    bad = stamp_hf("segment", "image.png", "x", "--model", "tiny", "--refine-sam", "missing.pth", cwd=workdir)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "missing.pth" in bad.stderr


def test_every_option_has_help_that_states_its_default():
    """`stamp-hf COMMAND --help` tells a new user what each option does and what happens without it."""
    import argparse

    from stamp_hf.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = []
    for name, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            flag_only = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if not action.help or (action.option_strings and not action.required and not flag_only
                                   and "default" not in action.help):
                missing.append(f"{name} {flag}")
    assert not missing
    assert len(commands) >= 10
