"""A tiny segmentation dataset written in the training format: coloured rectangles on cell-aligned positions, with
exact masks, so a model can learn them in a few steps."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# (height, width), shape box (top, left, bottom, right) in pixels on the 28 px patch grid, colour name, RGB
SHAPES = [
    ((112, 112), (28, 28, 84, 84), "red", (220, 30, 30)),
    ((84, 140), (0, 84, 56, 140), "blue", (30, 30, 220)),
    ((140, 84), (84, 0, 140, 56), "green", (30, 180, 30)),
    ((112, 168), (28, 0, 112, 56), "yellow", (230, 210, 20)),
]

# The paper's answers (Prompt S2): different lengths, so token-normalised losses are put to the test
ANSWERS = ["Sure, the segmentation result is <|seg|>.", "<|seg|>.", "Sure, <|seg|>.", "Sure, it is <|seg|>."]


def shape_mask(size, box):
    mask = np.zeros(size, dtype=bool)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = True
    return mask


def write_shapes_dataset(folder, mask_format="png", shapes=SHAPES) -> Path:
    """Write images/, masks/ and data.jsonl under `folder`; returns the .jsonl path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    lines = []
    for k, (size, box, name, rgb) in enumerate(shapes):
        image = np.full((*size, 3), 245, dtype=np.uint8)
        mask = shape_mask(size, box)
        image[mask] = rgb
        Image.fromarray(image).save(folder / "images" / f"{k}.png")
        top, left, bottom, right = box
        if mask_format == "png":
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{k}.png")
            spec = {"png": f"masks/{k}.png"}
        else:  # polygon with vertices on pixel corners: pycocotools fills exactly the box
            spec = {"polygons": [[left, top, right, top, right, bottom, left, bottom]]}
        lines.append(
            {
                "image": f"images/{k}.png",
                "messages": [
                    {"role": "user", "content": f"Please segment the {name} square."},
                    {"role": "assistant", "content": ANSWERS[k % len(ANSWERS)]},
                ],
                "masks": [spec],
            }
        )
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def write_shapes_refer(folder, shapes=SHAPES) -> Path:
    """The same shapes as a REFER export (what RefCOCO ships): images/, instances.json with one polygon annotation per
    image, refs(unc).p (a pickle, as released) with one "train" reference each, sentence "<colour> square"."""
    import pickle

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, refs = [], [], []
    for k, (size, box, name, rgb) in enumerate(shapes):
        image = np.full((*size, 3), 245, dtype=np.uint8)
        image[shape_mask(size, box)] = rgb
        file_name = f"COCO_train2014_{k:012d}.png"
        Image.fromarray(image).save(folder / "images" / file_name)
        top, left, bottom, right = box
        images.append({"id": k, "file_name": file_name, "height": size[0], "width": size[1]})
        annotations.append({"id": k, "image_id": k, "category_id": 1, "iscrowd": 0,
                            "segmentation": [[left, top, right, top, right, bottom, left, bottom]]})
        text = f"{name} square"
        refs.append({"ref_id": k, "ann_id": k, "image_id": k, "split": "train", "category_id": 1, "sent_ids": [k],
                     "file_name": file_name, "sentences": [{"sent_id": k, "sent": text, "raw": text,
                                                            "tokens": text.split()}]})
    instances = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "square"}]}
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs))
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread; on shared cores several OpenMP threads spin against each other
    (tens of times slower). Import this fixture into a test module to use it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
