"""Evaluate a STAMP checkpoint on referring segmentation data: cIoU, gIoU, and gRefCOCO's N-acc / T-acc.

DATA is a .jsonl file of the training format, a REFER folder (refs(unc).p + instances.json), a gRefCOCO folder
(grefs(unc).json + instances.json) or a ReasonSeg folder (NAME.json + NAME.jpg). A .jsonl file is evaluated turn by
turn (earlier answers as the record gives them): a turn with <|seg|> against its own masks, a turn without as VQA
(exact match, reported apart); every record is checked before the model loads. Per-sample results go to
OUTPUT/results.jsonl, the summary table to OUTPUT/summary.md and summary.json; rerunning the same command resumes,
once the model's weights and config, the data and the settings are those of the run that wrote the results
(--restart starts over). With --refine-sam, SAM-refined masks are scored too and reported in a second row;
--sam-protocol chooses how SAM is prompted (default the checkpoint's: "official" for converted released
checkpoints), recorded in summary.json. Run it under `accelerate launch` or `torchrun` to split the samples over
several processes."""

from pathlib import Path

from stamp_hf.cli import CommandError

from ._checks import check_at_least, check_exists, check_folder, check_output_folder
from ._common import add_model_arguments, check_model_arguments


def add_arguments(parser):
    add_model_arguments(parser, refine=False, max_new_tokens=64,
                        pickles="REFER's refs(*).p and a checkpoint whose weights are pickled (pytorch_model.bin)")
    parser.add_argument("--data", required=True, type=Path, help="the data file or folder (see above)")
    parser.add_argument("--split", default=None, help="split to evaluate (default: val for REFER and gRefCOCO; "
                        "ReasonSeg: a subfolder such as val or test, default the folder itself)")
    parser.add_argument("--output", required=True, type=Path, help="folder for results.jsonl and the summary")
    parser.add_argument("--restart", action="store_true", help="remove the results already in --output and start "
                        "over (default: resume them, if they are of the same model, data and settings)")
    parser.add_argument("--split-by", default="unc", help="REFER / gRefCOCO partition: unc, umd, google (default unc)")
    parser.add_argument("--images", type=Path, default=None, help="image folder for REFER / gRefCOCO (COCO train2014; "
                        "default: none, the annotations' paths)")
    parser.add_argument("--prompt", default=None, help="question template for REFER / gRefCOCO, '{}' = the "
                        "expression (default: 'Please segment only the {} in the image.')")
    parser.add_argument("--refine-sam", metavar="CKPT", default=None, help="also score masks refined with SAM: a "
                        "Hub id / folder (transformers SamModel) or a .pth file (segment-anything) (default: none)")
    parser.add_argument("--sam-protocol", choices=["official", "stamp"], default=None, help="how --refine-sam prompts "
                        "SAM: 'official' (the official STAMP eval: 10 + 10 points, its mask prompt) or 'stamp' (3 + 3 "
                        "points, a +-20 logit prompt); default the checkpoint processor's sam_protocol")
    parser.add_argument("--batch-size", type=int, default=1, help="samples generated together (default 1)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples (default: all)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own modeling code "
                        "(default off: the package's STAMP classes load STAMP folders without it)")


def run(args) -> int:
    check_model_arguments(args)  # every argument before torch loads
    check_at_least(args, 1, "batch_size", "limit")
    check_exists(args.data, "--data", "data file or folder")
    if args.images is not None:
        check_folder(args.images, "--images")
    if args.sam_protocol and not args.refine_sam:
        raise CommandError("--sam-protocol chooses how --refine-sam prompts SAM: give --refine-sam too")
    if args.prompt is not None and args.prompt.count("{}") != 1:
        raise CommandError(f"--prompt must contain '{{}}' once (where the expression goes), got {args.prompt!r}")
    check_output_folder(args.output, "--output")

    from stamp_hf.commands._common import resolve_device
    from stamp_hf.evaluation import RES_PROMPT, check_run, evaluate, load_samples, model_fingerprint, samples_fingerprint

    prompt = args.prompt or RES_PROMPT
    device = resolve_device(args.device)
    samples = load_samples(args.data, args.split, args.split_by, args.images, args.allow_pickle, prompt)
    run_info = {
        "model": _normalized(args.model), "model_fingerprint": model_fingerprint(args.model),
        "data": str(args.data.resolve()), "data_fingerprint": samples_fingerprint(samples),
        "split": args.split, "split_by": args.split_by, "images": _normalized(args.images), "prompt": prompt,
        "max_new_tokens": args.max_new_tokens, "limit": args.limit, "dtype": args.dtype or "auto",
        "refine_sam": _normalized(args.refine_sam),
    }
    if args.limit is not None:
        samples = samples[: args.limit]
    known = run_info if run_info["model_fingerprint"] else {k: v for k, v in run_info.items() if k != "model_fingerprint"}
    check_run(args.output, known, args.restart, only_given=True)  # before the model loads

    import torch
    from transformers import AutoModel, AutoProcessor

    dtype = getattr(torch, args.dtype) if args.dtype else "auto"
    model = AutoModel.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code,
                                      allow_pickle=args.allow_pickle)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    if run_info["model_fingerprint"] is None:  # a Hub id: the folder it was loaded from
        run_info["model_fingerprint"] = _hub_fingerprint(args.model)
    refiner = None
    if args.refine_sam:
        from stamp_hf.sam_stamp import sam_refiner

        refiner = sam_refiner(args.refine_sam)
    evaluate(model, processor, samples, args.output, run_info, refiner, args.max_new_tokens, batch_size=args.batch_size,
             sam_protocol=args.sam_protocol, device=device if args.device else None)
    return 0


def _normalized(path):
    """A local path as its absolute form (`./runs/lora` and `runs/lora` are one model); a Hub id or None as is."""
    if path is None:
        return None
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def _hub_fingerprint(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    from stamp_hf.evaluation import model_fingerprint

    try:
        return model_fingerprint(snapshot_download(repo_id, local_files_only=True)) or repo_id
    except Exception:  # noqa: BLE001 (not in the cache as a snapshot: the id is all that identifies it)
        return repo_id
