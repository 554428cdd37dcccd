"""Evaluate a STAMP checkpoint on referring segmentation data: cIoU, gIoU, and gRefCOCO's N-acc / T-acc.

DATA is a .jsonl file of the training format, a REFER folder (refs(unc).p + instances.json), a gRefCOCO folder
(grefs(unc).json + instances.json) or a ReasonSeg folder (NAME.json + NAME.jpg). Per-sample results go to
OUTPUT/results.jsonl, the summary table to OUTPUT/summary.md and summary.json; rerunning the same command resumes.
With --refine-sam, SAM-refined masks are scored too and reported in a second row; --sam-protocol chooses how SAM is
prompted (default the checkpoint's: "official" for converted released checkpoints), recorded in summary.json.
Run it under `accelerate launch` or `torchrun` to split the samples over several processes."""

from pathlib import Path

from stamp_hf.cli import CommandError


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="a STAMP checkpoint (folder or Hub id)")
    parser.add_argument("--data", required=True, type=Path, help="the data file or folder (see above)")
    parser.add_argument("--split", default=None, help="split to evaluate (REFER, gRefCOCO: default val; ReasonSeg: "
                        "a subfolder such as val or test)")
    parser.add_argument("--output", required=True, type=Path, help="folder for results.jsonl and the summary")
    parser.add_argument("--split-by", default="unc", help="REFER / gRefCOCO partition: unc, umd, google (default unc)")
    parser.add_argument("--images", type=Path, default=None, help="image folder for REFER / gRefCOCO (COCO train2014)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading pickles: REFER's refs(*).p, "
                        "a model with only pytorch_model.bin (a pickle can run code: only for files you trust)")
    parser.add_argument("--prompt", default=None, help="question template for REFER / gRefCOCO, '{}' = the "
                        "expression (default: 'Please segment only the {} in the image.')")
    parser.add_argument("--refine-sam", metavar="CKPT", default=None, help="also score masks refined with SAM: a "
                        "Hub id / folder (transformers SamModel) or a .pth file (segment-anything)")
    parser.add_argument("--sam-protocol", choices=["official", "stamp"], default=None, help="how --refine-sam prompts "
                        "SAM: 'official' (the official STAMP eval: 10 + 10 points, its mask prompt) or 'stamp' (3 + 3 "
                        "points, a +-20 logit prompt); default the checkpoint processor's sam_protocol")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1, help="samples generated together (default 1)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    parser.add_argument("--dtype", default="auto", help="weights dtype: auto, float32, bfloat16, float16")
    parser.add_argument("--trust-remote-code", action="store_true")


def run(args) -> int:
    import torch
    from transformers import AutoModel, AutoProcessor

    from stamp_hf.evaluation import RES_PROMPT, evaluate, load_samples

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.sam_protocol and not args.refine_sam:
        raise CommandError("--sam-protocol chooses how --refine-sam prompts SAM: give --refine-sam too")
    prompt = args.prompt or RES_PROMPT
    if prompt.count("{}") != 1:
        raise CommandError(f"--prompt must contain '{{}}' once (where the expression goes), got {prompt!r}")
    samples = load_samples(args.data, args.split, args.split_by, args.images, args.allow_pickle, prompt)
    if args.limit is not None:
        samples = samples[: args.limit]
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype, None)
    if dtype is None:
        raise CommandError(f"unknown --dtype {args.dtype!r}")
    model = AutoModel.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code,
                                      allow_pickle=args.allow_pickle)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    refiner = None
    if args.refine_sam:
        from stamp_hf.sam_stamp import sam_refiner

        refiner = sam_refiner(args.refine_sam)
    run_info = {"model": args.model, "data": str(args.data.resolve()), "split": args.split, "split_by": args.split_by,
                "prompt": prompt, "max_new_tokens": args.max_new_tokens, "limit": args.limit, "refine_sam": args.refine_sam}
    evaluate(model, processor, samples, args.output, run_info, refiner, args.max_new_tokens, batch_size=args.batch_size,
             sam_protocol=args.sam_protocol)
    return 0
