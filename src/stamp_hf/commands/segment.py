"""Segment what a sentence describes in an image: prints the answer, writes the masks and an overlay."""

import json
import time
from pathlib import Path

import numpy as np

from ._checks import check_image
from ._common import (add_model_arguments, check_model_arguments, check_output_file, check_prompt, check_writable,
                      load, log, mask_count, write_all)


def add_arguments(parser):
    parser.add_argument("image", help="image file")
    parser.add_argument("prompt", help='what to segment, e.g. "Please segment the red car."')
    add_model_arguments(parser)
    parser.add_argument("--out", metavar="MASK.png", help="write the mask (several masks: MASK_0.png, MASK_1.png, ...) (default: no mask file)")
    parser.add_argument("--overlay", metavar="OVERLAY.png", help="write the image with the masks drawn on it (default: no overlay)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")


def mask_paths(out: Path, count: int) -> list[Path]:
    return [out] if count == 1 else [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(count)]


def check(args):
    """Every argument, before torch loads: one line within a second for a mistake."""
    check_model_arguments(args)
    check_image(args.image)
    out = check_output_file(args.out, "--out") if args.out else None
    overlay = check_output_file(args.overlay, "--overlay") if args.overlay else None
    check_writable([p for p in (out, overlay) if p], args.force)
    return out, overlay


def run(args):
    out, overlay = check(args)
    from transformers import pipeline

    from ..overlay import overlay_masks
    from ..pipeline_stamp import PIPELINE_TASK
    from ..processing_stamp import load_image

    check_prompt(args.prompt)
    image = load_image(args.image)  # before the model loads: a bad image costs nothing
    model, processor, refiner = load(args)
    pipe = pipeline(PIPELINE_TASK, model=model, processor=processor, device=model.device)
    start = time.perf_counter()
    result = pipe(image, args.prompt, max_new_tokens=args.max_new_tokens, refine=refiner is not None,
                  sam_model=refiner)
    log(f"answered in {time.perf_counter() - start:.2f}s: {mask_count(result['masks'])}")

    masks = result["masks"]
    files = mask_paths(out, len(masks)) if out and masks else []
    if out and not masks:
        log(f"the answer has no <|seg|>: no mask written to {out}")
    check_writable(files, args.force)
    outputs = dict(zip(files, (entry["mask"] for entry in masks)))
    if overlay:
        outputs[overlay] = overlay_masks(image, [m["mask"] for m in masks])
    write_all(outputs)
    named = files + [None] * (len(masks) - len(files))
    if args.json:
        summary = [
            {"label": m["label"], "score": round(m["score"], 4), "area": int((np.asarray(m["mask"]) > 0).sum()),
             "file": str(path) if path else None}
            for m, path in zip(masks, named)
        ]
        print(json.dumps({"text": result["text"], "size": [image.width, image.height], "masks": summary,
                          "overlay": str(overlay) if overlay else None}))
    else:
        print(result["text"])
        for k, (m, path) in enumerate(zip(masks, named)):
            print(f"mask {k}: {m['label']!r} score {m['score']:.3f}" + (f" -> {path}" if path else ""))
    return 0
