"""cIoU / gIoU of the shipped demo model with each mask post-processing, on the synthetic test split (the 300
samples the README's results use): "nearest" (the official STAMP procedure: threshold the patch grid, then nearest
upsampling) against "bilinear" (upsample the logits, then threshold: what its image-resolution loss trained for).

    .venv/bin/python benchmarks/demo_resample.py [--samples 300] [--out runs/demo_resample]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor

from stamp_hf.demo_model import DEMO_MODEL
from stamp_hf.synthetic.scenes import write_split
from stamp_hf.synthetic.stages import evaluate_demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/demo_resample"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = write_split(args.out / "data", "test", args.samples)
    model = AutoModel.from_pretrained(DEMO_MODEL, trust_remote_code=True).eval()
    rows = {}
    for resample in ("nearest", "bilinear"):
        processor = AutoProcessor.from_pretrained(DEMO_MODEL, trust_remote_code=True)
        processor.mask_resample = resample  # this run's own processor
        start = time.perf_counter()
        metrics = evaluate_demo(model, processor, data, args.out / resample)
        rows[resample] = {key: metrics[key] for key in ("cIoU", "gIoU", "N-acc", "cIoU_by_form")}
        rows[resample]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"demo model, {args.samples}-sample synthetic test split; CPU: {os.cpu_count()} cores, {args.threads} "
          f"threads; Python {sys.version.split()[0]}\n")
    print("| post-processing | cIoU | gIoU | " + " | ".join(rows["nearest"]["cIoU_by_form"]) + " |")
    print("|---|---|---|" + "---|" * len(rows["nearest"]["cIoU_by_form"]))
    for resample, row in rows.items():
        kinds = " | ".join(f"{v:.1f}" for v in row["cIoU_by_form"].values())
        print(f"| {resample} | {row['cIoU']:.1f} | {row['gIoU']:.1f} | {kinds} |")
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
