"""Chat about an image: one question per line on stdin; the model keeps the conversation (and its cache). Each turn
prints the question and the answer (or, with --json, one JSON line: turn, question, answer, masks as COCO RLE);
--out-dir writes each mask as a PNG, --overlay-dir the image with each turn's masks."""

import json
import sys
import time

from ._checks import check_image, check_output_folder
from ._common import add_model_arguments, check_model_arguments, check_writable, load, log, mask_count, write_all


def add_arguments(parser):
    parser.add_argument("image", help="image file")
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON line per turn: turn, question, answer, masks (label, score, size, COCO RLE)")
    parser.add_argument("--out-dir", metavar="DIR",
                        help="write each mask as DIR/turn_<k>_mask_<i>.png (an empty mask only with --keep-empty) (default: no mask files)")
    parser.add_argument("--keep-empty", action="store_true",
                        help="with --out-dir: also write empty masks (default: an empty mask, nothing found, is not written)")
    parser.add_argument("--overlay-dir", metavar="DIR",
                        help="write turn_<k>.png, the image with that turn's masks, for each answer with a non-empty mask (default: no overlays)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files in --out-dir / --overlay-dir")


def run(args):
    check_model_arguments(args)
    check_image(args.image)
    out_dir = check_output_folder(args.out_dir, "--out-dir")
    overlay_dir = check_output_folder(args.overlay_dir, "--overlay-dir")
    if args.keep_empty and out_dir is None:
        raise ValueError("--keep-empty says which masks --out-dir writes: give --out-dir too")
    import numpy as np

    from ..conversation import Conversation
    from ..masks_json import mask_json
    from ..overlay import overlay_masks
    from ..processing_stamp import load_image

    image = load_image(args.image)
    model, processor, refiner = load(args)
    conversation = Conversation(model, processor, image, refiner=refiner)
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        question = line.strip()
        if not question:
            continue
        turn += 1
        start = time.perf_counter()
        answer = conversation.ask(question, max_new_tokens=args.max_new_tokens)
        masks = answer["masks"]
        log(f"turn {turn}: {time.perf_counter() - start:.2f}s, {mask_count(masks)}")
        found = [bool((np.asarray(m["mask"]) > 127).any()) for m in masks]
        outputs = {}
        files = [None] * len(masks)
        if out_dir is not None:
            for k, (entry, nonempty) in enumerate(zip(masks, found)):
                if nonempty or args.keep_empty:
                    files[k] = out_dir / f"turn_{turn}_mask_{k}.png"
                    outputs[files[k]] = entry["mask"]
        overlay = overlay_dir / f"turn_{turn}.png" if overlay_dir is not None and any(found) else None
        if overlay is not None:
            outputs[overlay] = overlay_masks(image, [m["mask"] for m in masks])
        if outputs:
            check_writable(outputs, args.force)
            for folder in {path.parent for path in outputs}:
                folder.mkdir(exist_ok=True)
            write_all(outputs)
        if args.json:
            entries = [{**mask_json(m), "file": str(path) if path else None} for m, path in zip(masks, files)]
            print(json.dumps({"turn": turn, "question": question, "answer": answer["text"], "masks": entries,
                              "overlay": str(overlay) if overlay else None}), flush=True)
            continue
        print(f"you> {question}\nstamp> {answer['text']}", flush=True)
        for k, (entry, path) in enumerate(zip(masks, files)):
            print(f"mask {k}: {entry['label']!r} score {entry['score']:.3f}" + (f" -> {path}" if path else ""),
                  flush=True)
        if overlay is not None:
            print(f"overlay -> {overlay}", flush=True)
    return 0
