"""The two SAM refinement protocols side by side, on what can be measured without a trained SAM: how faithfully each
one's mask prompt encodes the coarse mask STAMP hands over, what the official padding quirk puts in the prompt, and
how often each one's points carry the right label.

Scenes: stamp_hf.synthetic's shapes at the sizes of the demo's drawn set (320x240, 500x300, 200x400, 640x480), the
COCO sizes 640x480 / 500x333 and a square one, each object's exact mask as ground truth. Coarse mask: what a perfect
STAMP would output for it: the ground truth averaged over Qwen2-VL's merged patch grid at the paper's 1024-1280
placeholders, cells over half covered positive, upsampled as the official eval does (post_process_masks, "nearest").
Per object and protocol ("official": 10 + 10 points, 0/255 -> PIL bilinear -> pad 255 -> +-6.9 logits; "stamp": 3 + 3
points at pixel centres, +-20 logits, background padding):
  - prompt IoU: the 256 x 256 prompt decoded back to the image frame (its image part upsampled bilinearly to the
    image size, as SAM upsamples its low-resolution masks, logit > 0) against the coarse mask;
  - padding read as foreground: share of the prompt's padded area (outside the image) with logit > 0, and share of
    the prompt's whole foreground that lies there;
  - points: both protocols draw uniformly from the coarse mask's foreground and background, so a positive point lies
    on the object with the coarse mask's precision and a negative one off it with its background's (the same for
    both, shown once); what differs is the count, hence the expected number of mislabeled points per prompt and the
    chance that a prompt holds at least one (exact, draws without replacement).

What this cannot measure: the refined masks' IoU. That needs a trained SAM (ViT-H weights are not available offline
here); a random SAM's output says nothing about either protocol.

    .venv/bin/python benchmarks/sam_protocols.py [--scenes 40] [--json benchmarks/results/sam_protocols_cpu.json]
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from stamp_hf.processing_stamp import STAMPProcessor
from stamp_hf.sam_stamp import SAM_PROTOCOLS, protocol_prompts
from stamp_hf.synthetic.scenes import draw_scene
from stamp_hf.testing import tiny_tokenizer

SIZES = ((320, 240), (500, 300), (200, 400), (640, 480), (500, 333), (333, 500), (400, 400))  # (width, height)


def all_correct(good: int, total: int, draws: int) -> float:
    """Chance that `draws` pixels drawn without replacement from `total` all lie among `good`."""
    return math.prod((good - i) / (total - i) for i in range(draws)) if draws <= good else 0.0


def coarse_mask(processor, truth: np.ndarray) -> np.ndarray:
    """The best mask STAMP's patch grid can give: cells over half covered, upsampled by the official nearest."""
    height, width = truth.shape
    from PIL import Image

    grid_thw = processor.image_processor(Image.new("RGB", (width, height)), return_tensors="pt")["image_grid_thw"][0]
    rows, cols = processor.mask_grid(grid_thw)
    cover = F.adaptive_avg_pool2d(torch.from_numpy(truth).float()[None, None], (rows, cols))[0, 0]
    (mask,), = processor.post_process_masks([[cover - 0.5]], [(height, width)], resample="nearest")
    return mask.numpy()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def measure(processor, truth: np.ndarray, protocol: str) -> dict:
    coarse = coarse_mask(processor, truth)
    height, width = truth.shape
    scale = 256 / max(height, width)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    points, labels, prompt = protocol_prompts(coarse, protocol, seed=0)
    prompt = torch.as_tensor(prompt, dtype=torch.float64).reshape(256, 256)
    decoded = F.interpolate(prompt[None, None, :new_h, :new_w], size=(height, width), mode="bilinear",
                            align_corners=False)[0, 0] > 0
    padding = torch.ones(256, 256, dtype=torch.bool)
    padding[:new_h, :new_w] = False
    prompt_foreground = prompt > 0
    positives, negatives = int(labels.sum()), int(len(labels) - labels.sum())
    on_object, off_object = int((coarse & truth).sum()), int((~coarse & ~truth).sum())
    foreground, background = int(coarse.sum()), int((~coarse).sum())
    return {
        "coarse_iou_vs_truth": iou(coarse, truth),
        "prompt_iou_vs_coarse": iou(decoded.numpy(), coarse),
        "padding_share_of_frame": float(padding.float().mean()),
        "padding_read_as_foreground": float(prompt_foreground[padding].float().mean()) if padding.any() else 0.0,
        "prompt_foreground_in_padding": float((prompt_foreground & padding).sum() / max(int(prompt_foreground.sum()), 1)),
        "mean_abs_logit_in_image": float(prompt[:new_h, :new_w].abs().mean()),
        "positive_on_object": on_object / foreground,
        "negative_off_object": off_object / background,
        "points": positives + negatives,
        "expected_wrong_points": positives * (1 - on_object / foreground) + negatives * (1 - off_object / background),
        "any_wrong_point": 1 - all_correct(on_object, foreground, positives) * all_correct(off_object, background, negatives),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=40, help="scenes per image size")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/sam_protocols_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    processor = STAMPProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tiny_tokenizer(),
                               min_placeholders=1024, max_placeholders=1280)
    rows = {protocol: {} for protocol in SAM_PROTOCOLS}
    for width, height in SIZES:
        per = {protocol: [] for protocol in SAM_PROTOCOLS}
        for scene in range(args.scenes):
            _, _, masks = draw_scene(random.Random(scene), (width, height))
            for truth in masks:
                for protocol in SAM_PROTOCOLS:
                    per[protocol].append(measure(processor, truth, protocol))
        for protocol in SAM_PROTOCOLS:
            rows[protocol][f"{width}x{height}"] = {key: float(np.mean([m[key] for m in per[protocol]]))
                                                  for key in per[protocol][0]} | {"objects": len(per[protocol])}
    keys = ["coarse_iou_vs_truth", "prompt_iou_vs_coarse", "padding_share_of_frame", "padding_read_as_foreground",
            "prompt_foreground_in_padding", "mean_abs_logit_in_image", "positive_on_object", "negative_off_object",
            "points", "expected_wrong_points", "any_wrong_point"]
    print(f"{args.scenes} synthetic scenes per size, each object's exact mask; coarse mask = the patch grid's best "
          f"(1024-1280 placeholders), official nearest upsampling; Python {sys.version.split()[0]}, torch "
          f"{torch.__version__}\n")
    print("| size | objects | protocol | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for size in rows["official"]:
        for protocol in SAM_PROTOCOLS:
            row = rows[protocol][size]
            print(f"| {size} | {row['objects']} | {protocol} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    overall = {protocol: {k: float(np.mean([rows[protocol][s][k] for s in rows[protocol]])) for k in keys}
               for protocol in SAM_PROTOCOLS}
    for protocol in SAM_PROTOCOLS:
        print(f"| mean of sizes | | {protocol} | " + " | ".join(f"{overall[protocol][k]:.3f}" for k in keys) + " |")
    seconds = round(time.perf_counter() - start, 1)
    print(f"\n{seconds} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {"scenes": args.scenes}, "sizes": rows, "mean_of_sizes": overall,
                                     "seconds": seconds}, indent=1) + "\n")


if __name__ == "__main__":
    main()
