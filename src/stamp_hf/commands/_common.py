"""What the `segment` and `chat` commands share: the model options, loading, the mask count they print, safe output
files."""

import os
import sys
import time
from pathlib import Path

from ..cli import CommandError, one_line
from ._checks import check_at_least, check_device, check_source
from ..demo_model import DEMO_MODEL

# The small synthetic-shapes demo STAMP shipped with the package (see demo_model/README.md): `stamp-hf segment`
# works offline out of the box; real checkpoints are one --model away.
DEFAULT_MODEL = str(DEMO_MODEL)


DTYPES = ("float32", "bfloat16", "float16")


def add_model_arguments(parser, refine: bool = True, max_new_tokens: int = 256,
                        pickles: str = "a checkpoint whose weights are pickled (pytorch_model.bin)"):
    """The options that pick and load a model, the same in every command that loads one; `refine`: also
    --refine-sam; `pickles`: what --allow-pickle allows in this command."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="STAMP checkpoint: a Hub repo id or a local folder (default: the bundled synthetic-shapes demo "
                        "model, not the paper's)")
    parser.add_argument("--device", default=None,
                        help="torch device: cpu, cuda, cuda:N, mps, ... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights and compute dtype (default: the checkpoint's own)")
    if refine:
        parser.add_argument("--refine-sam", metavar="CKPT", default=None,
                            help="refine masks with SAM: a Hub id / folder (transformers SamModel) or a .pth file "
                            "(segment-anything) (default: no refinement)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                        help=f"most tokens generated per answer (default: {max_new_tokens})")
    parser.add_argument("--allow-pickle", action="store_true",
                        help=f"allow {pickles}: unpickling can run code, only for files you trust")


def check_model_arguments(args) -> None:
    """The options of add_model_arguments, checked before torch loads (see _checks)."""
    check_device(args.device)
    check_at_least(args, 1, "max_new_tokens")
    check_source(args.model, "--model", "model")
    if getattr(args, "refine_sam", None):
        check_source(args.refine_sam, "--refine-sam", "SAM model", file_suffixes=(".pth", ".pt"))


def check_prompt(prompt: str) -> str:
    """The pipeline's own check (one message everywhere a prompt is taken), as a one-line command error."""
    from ..pipeline_stamp import check_prompt as pipeline_check

    try:
        return pipeline_check(prompt)
    except ValueError as error:
        raise CommandError(str(error)) from None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def mask_count(masks) -> str:
    """How many masks an answer has, and how many of them are empty: STAMP answers a request for something that is
    not in the image with a `<|seg|>` like any other, and only the empty mask says that nothing was found. `masks`:
    the pipeline's entries ({"mask": PIL "L" image, ...}). Said by `segment`, `chat` and the web demo's status line."""
    import numpy as np

    empty = sum(not (np.asarray(entry["mask"]) > 127).any() for entry in masks)
    return f"{len(masks)} mask(s)" + (f", {empty} empty (nothing found)" if empty else "")


def resolve_device(name: str | None):
    """The torch device `--device` names, checked before anything loads."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type, lambda: True)
    if not available():
        raise CommandError(f"--device {name}: this machine has no {device.type.upper()} device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CommandError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load(args):
    """Model, processor and SAM refiner (or None) from the command-line options, timed on stderr."""
    from transformers import AutoModel, AutoProcessor

    from ..modeling_stamp import register_auto_classes
    from ..sam_stamp import sam_refiner

    register_auto_classes()  # AutoModel / AutoProcessor load STAMP folders without trust_remote_code

    start = time.perf_counter()
    device = resolve_device(args.device)
    dtype = {"dtype": args.dtype} if getattr(args, "dtype", None) else {}
    try:
        model = AutoModel.from_pretrained(args.model, allow_pickle=args.allow_pickle, **dtype).to(device).eval()
        processor = AutoProcessor.from_pretrained(args.model)
    except OSError as error:
        raise CommandError(f"--model {args.model}: cannot load a STAMP model from it ({one_line(error)})") from None
    refiner = None
    if getattr(args, "refine_sam", None):
        try:
            refiner = sam_refiner(args.refine_sam)
        except (OSError, ValueError) as error:
            raise CommandError(f"--refine-sam {args.refine_sam}: cannot load the SAM model ({one_line(error)})") \
                from None
    log(f"loaded {args.model} on {device} in {time.perf_counter() - start:.1f}s")
    return model, processor, refiner


def check_output_file(path, option: str) -> Path:
    """An image file the command may write: a known image extension, in a folder that exists, not a folder."""
    from PIL import Image

    path = Path(path)
    if path.is_dir():
        raise CommandError(f"{option} {path} is a folder; give a file name such as {path / 'mask.png'}")
    if path.suffix.lower() not in Image.registered_extensions():
        raise CommandError(f"{option} {path}: unknown image file extension {path.suffix!r} (use .png)")
    if not path.parent.is_dir():
        raise CommandError(f"{option} {path}: the folder {path.parent} does not exist")
    return path


def check_writable(paths, force: bool) -> None:
    """Refuse, before any work, to overwrite a file the user has unless --force."""
    for path in paths:
        if Path(path).exists() and not force:
            raise CommandError(f"{path} exists; pass --force to overwrite it")


def write_all(images: dict) -> None:
    """Write {path: PIL image} all or nothing: each to a temporary file beside it, then every one renamed into place,
    so a failure leaves neither a partial set nor a torn file (and the user's files as they were)."""
    temporary = {}
    try:
        for path, image in images.items():
            path = Path(path)
            temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            image.save(temp, format=image_format(path))
            temporary[path] = temp
        for path, temp in temporary.items():
            os.replace(temp, path)
    finally:
        for temp in temporary.values():
            if temp.exists():
                temp.unlink()


def image_format(path: Path) -> str:
    """The PIL format name of an image file name's extension (checked by check_output_file)."""
    from PIL import Image

    return Image.registered_extensions()[path.suffix.lower()]
