"""Turn a standard dataset into the JSON Lines training format of `stamp-hf train`.

DATA is a REFER folder (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF: refs(unc).p + instances.json), a gRefCOCO folder
(grefs(unc).json + instances.json), a ReasonSeg folder (NAME.json + NAME.jpg, the split a subfolder) or a LLaVA
instruction file (.json: a list of {"image", "conversations"}). One record per referring sentence (or ReasonSeg query),
asked and answered with the paper's templates (Prompts S1, S2) drawn with --seed; gRefCOCO multi-object sentences
get the union mask, no-target ones an empty mask; LLaVA conversations become multi-turn records without masks.
Masks are written inline as COCO RLE, images referenced where they are. The same arguments write the same bytes;
nothing is written when an image or a mask is missing. Large files are streamed and records written as they are made,
so memory stays flat at paper scale; a progress bar on stderr counts records written and sources read (TQDM_DISABLE=1
turns it off)."""

from pathlib import Path

from stamp_hf.cli import CommandError

from ._checks import check_at_least, check_exists, check_folder
from ._common import log


def add_arguments(parser):
    parser.add_argument("--data", required=True, type=Path, help="the dataset folder or LLaVA .json file (see above)")
    parser.add_argument("--split", default=None, help="REFER / gRefCOCO split (train, val, ...; required there); "
                        "ReasonSeg: the subfolder (train, val); none for LLaVA (default: none, the ReasonSeg folder itself)")
    parser.add_argument("--output", required=True, type=Path, help="the .jsonl file to write")
    parser.add_argument("--images", type=Path, default=None, help="image folder: COCO train2014 (RefCOCO*, gRefCOCO), "
                        "saiapr_tc-12 (RefCLEF), the LLaVA image root (default: next to the data)")
    parser.add_argument("--split-by", default="unc", help="REFER / gRefCOCO partition: unc, umd (RefCOCOg), google "
                        "(default unc)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading REFER's refs(*).p pickle "
                        "(loading a pickle can run code: only for files you trust)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the template draws (default 0)")
    parser.add_argument("--repeats", type=int, default=1, help="records per sentence, each with its own templates "
                        "(default 1; 2 is the official code's construction)")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")


def run(args) -> int:
    check_at_least(args, 1, "repeats")  # every argument before torch loads
    check_exists(args.data, "--data", "data file or folder")
    if args.images is not None:
        check_folder(args.images, "--images")
    from stamp_hf.prepare import prepare_data

    result = prepare_data(args.data, args.output, args.split, args.images, args.split_by, args.allow_pickle,
                          args.seed, args.repeats, args.force)
    skipped = f", {result['skipped']} text-only samples left out" if result["skipped"] else ""
    log(f"wrote {result['records']} records from {result['sources']} {result['format']} sources to "
        f"{result['output']}{skipped}")
    return 0
