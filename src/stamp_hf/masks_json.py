"""A mask as JSON, the one format the HTTP server and `stamp-hf chat --json` print: COCO compressed RLE, encoded
here in numpy (pycocotools' `mask.encode(...)["counts"]`, byte for byte, without needing pycocotools)."""

import numpy as np


def rle_counts(mask: np.ndarray) -> str:
    """COCO's compressed RLE string of a boolean (H, W) mask: run lengths in column-major order, starting with a run
    of zeros, each written as the difference to the run two before it (from the fourth on), 5 bits a character."""
    flat = np.asarray(mask, bool).ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    text = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            text.append(chr((c | 0x20 if more else c) + 48))
    return "".join(text)


def mask_json(entry: dict) -> dict:
    """A pipeline mask entry as JSON: COCO compressed RLE at the image's size, with its label, score and image
    index."""
    mask = np.asarray(entry["mask"]) > 0
    return {"label": entry["label"], "score": round(float(entry["score"]), 6), "image": entry.get("image", 0),
            "size": [int(mask.shape[0]), int(mask.shape[1])], "rle": rle_counts(mask)}
