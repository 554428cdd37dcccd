"""Tiny datasets written by hand in the exact public formats (REFER, gRefCOCO, ReasonSeg, LLaVA), shared by the
evaluation and prepare-data tests."""

import json
import pickle

from PIL import Image

IMAGE_SIZE = (60, 40)  # (width, height) of the two COCO images


def write_coco(root, image_root):
    """Two 40x60 images; annotation 1 a polygon (rows 10-20, cols 10-30), 2 an uncompressed RLE (column 50)."""
    image_root.mkdir(parents=True, exist_ok=True)
    for name in ("COCO_train2014_000000000001.jpg", "COCO_train2014_000000000002.jpg"):
        Image.new("RGB", IMAGE_SIZE, "gray").save(image_root / name)
    column = [50 * 40, 40, 9 * 40]  # column-major runs: 50 background columns, column 50 foreground, 9 background
    instances = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 40, "width": 60},
                   {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": 40, "width": 60}],
        "annotations": [
            {"id": 1, "image_id": 1, "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]], "iscrowd": 0},
            {"id": 2, "image_id": 2, "segmentation": {"size": [40, 60], "counts": column}, "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "instances.json").write_text(json.dumps(instances))


def sentence(sent_id, text):
    return {"sent_id": sent_id, "sent": text, "raw": text, "tokens": text.split()}


# REFER references: two in val (3 sentences), two in train (3 sentences)
REFS = [
    {"ref_id": 0, "ann_id": 1, "image_id": 1, "split": "val", "category_id": 1, "sent_ids": [0, 1],
     "file_name": "COCO_train2014_000000000001_1.jpg", "sentences": [sentence(0, "left box"), sentence(1, "the box")]},
    {"ref_id": 1, "ann_id": 2, "image_id": 2, "split": "val", "category_id": 1, "sent_ids": [2],
     "file_name": "COCO_train2014_000000000002_2.jpg", "sentences": [sentence(2, "thin line")]},
    {"ref_id": 2, "ann_id": 1, "image_id": 1, "split": "train", "category_id": 1, "sent_ids": [3],
     "file_name": "COCO_train2014_000000000001_1.jpg", "sentences": [sentence(3, "train only")]},
    {"ref_id": 3, "ann_id": 2, "image_id": 2, "split": "train", "category_id": 1, "sent_ids": [4, 5],
     "file_name": "COCO_train2014_000000000002_2.jpg", "sentences": [sentence(4, "a line"), sentence(5, "white line")]},
]

# gRefCOCO references: a two-object one and a no-target one (2 sentences) in val, one in testA
GREFS = [
    {"ref_id": 0, "image_id": 1, "ann_id": [1, 2], "category_id": [1, 1], "no_target": False, "split": "val",
     "sent_ids": [0], "file_name": "x.jpg", "sentences": [sentence(0, "both things")]},
    {"ref_id": 1, "image_id": 2, "ann_id": [-1], "category_id": [-1], "no_target": True, "split": "val",
     "sent_ids": [1, 2], "file_name": "y.jpg", "sentences": [sentence(1, "a cat"), sentence(2, "the dog")]},
    {"ref_id": 2, "image_id": 2, "ann_id": [2], "category_id": [1], "no_target": False, "split": "testA",
     "sent_ids": [3], "file_name": "y.jpg", "sentences": [sentence(3, "line")]},
]


def write_refer(root, refs=REFS, image_root=None, split_by="unc"):
    """A REFER folder: refs(SPLIT_BY).p (a pickle, as released) + instances.json; images in `image_root`."""
    root.mkdir(parents=True, exist_ok=True)
    write_coco(root, image_root or root)
    (root / f"refs({split_by}).p").write_bytes(pickle.dumps(refs))
    return root


def write_grefcoco(root, grefs=GREFS, image_root=None):
    """A gRefCOCO folder: grefs(unc).json + instances.json; images in `image_root` (default: the folder)."""
    root.mkdir(parents=True, exist_ok=True)
    write_coco(root, image_root or root)
    (root / "grefs(unc).json").write_text(json.dumps(grefs))
    return root


def write_reasonseg_annotation(folder, name, size, texts, is_sentence, shapes):
    """One ReasonSeg image and its labelme-style JSON; shapes: [(label, [[x, y], ...]), ...]."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(folder / f"{name}.jpg")
    (folder / f"{name}.json").write_text(json.dumps({
        "text": texts, "is_sentence": is_sentence,
        "shapes": [{"label": label, "points": points, "shape_type": "polygon"} for label, points in shapes],
    }))


def write_llava(path, samples):
    """A LLaVA instruction file: a JSON list of {"id", "image", "conversations"}."""
    path.write_text(json.dumps(samples, indent=1))
    return path
