"""Chat about an image: one question per line on stdin; the model keeps the conversation (and its cache)."""

import sys
import time
from pathlib import Path

from ._common import add_model_arguments, check_writable, load, log, mask_count, write_all


def add_arguments(parser):
    parser.add_argument("image", help="image file")
    add_model_arguments(parser)
    parser.add_argument("--overlay-dir", metavar="DIR",
                        help="write turn_<k>.png, the image with that turn's masks, for each answer with masks")
    parser.add_argument("--force", action="store_true", help="overwrite existing files in --overlay-dir")


def run(args):
    from ..conversation import Conversation
    from ..overlay import overlay_masks
    from ..processing_stamp import load_image

    image = load_image(args.image)
    overlay_dir = Path(args.overlay_dir) if args.overlay_dir else None
    if overlay_dir is not None and overlay_dir.exists() and not overlay_dir.is_dir():
        raise ValueError(f"{overlay_dir} is not a folder")
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
        log(f"turn {turn}: {time.perf_counter() - start:.2f}s, {mask_count(answer['masks'])}")
        print(answer["text"], flush=True)
        if overlay_dir is not None and answer["masks"]:
            path = overlay_dir / f"turn_{turn}.png"
            check_writable([path], args.force)
            overlay_dir.mkdir(parents=True, exist_ok=True)
            write_all({path: overlay_masks(image, [m["mask"] for m in answer["masks"]])})
            print(f"masks: {', '.join(repr(m['label']) for m in answer['masks'])} -> {path}", flush=True)
    return 0
