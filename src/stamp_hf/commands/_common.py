"""What the `segment` and `chat` commands share: the model option, loading, image reading, safe output paths."""

import sys
import time
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..cli import CommandError
from ..demo import DEMO_MODEL

# The small synthetic-shapes demo STAMP shipped with the package (see demo_model/README.md): `stamp-hf segment`
# works offline out of the box; real checkpoints are one --model away.
DEFAULT_MODEL = str(DEMO_MODEL)


def add_model_arguments(parser):
    parser.add_argument("--model", default=DEFAULT_MODEL, required=DEFAULT_MODEL is None,
                        help="STAMP checkpoint: a Hub repo id or a local folder (default: the bundled synthetic-shapes demo "
                        "model, not the paper's)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--refine-sam", metavar="CKPT", default=None,
                        help="refine masks with SAM: a Hub id / folder (transformers SamModel) or a .pth file "
                        "(segment-anything)")
    parser.add_argument("--max-new-tokens", type=int, default=256)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_image(path: str) -> Image.Image:
    """The image at `path`, upright (EXIF orientation applied), RGB; a one-line error if it cannot be read."""
    if not Path(path).is_file():
        raise CommandError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise CommandError(f"{path}: cannot read it as an image ({error})") from None


def check_writable(paths, force: bool) -> None:
    """Refuse, before any work, to overwrite a file the user has unless --force."""
    for path in paths:
        if Path(path).exists() and not force:
            raise CommandError(f"{path} exists; pass --force to overwrite it")


def load(args):
    """Model, processor and SAM refiner (or None) from the command-line options, timed on stderr."""
    import torch
    from transformers import AutoModel, AutoProcessor

    from ..sam_stamp import sam_refiner

    start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = AutoModel.from_pretrained(args.model).to(device).eval()
        processor = AutoProcessor.from_pretrained(args.model)
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(f"{args.model}: cannot load a STAMP model from it ({reason})") from None
    refiner = sam_refiner(args.refine_sam) if args.refine_sam else None
    log(f"loaded {args.model} on {device} in {time.perf_counter() - start:.1f}s")
    return model, processor, refiner
