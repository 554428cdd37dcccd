"""STAMP's training step side by side with the official one and with a plain causal fine-tuning step: time, samples/s
and peak memory (Qwen2-VL-2B layer shapes, random weights), with and without gradient checkpointing.

One model (Qwen2-VL-2B layer shapes, depth reduced to --text-layers / --vision-layers; see speed.py), all of it
trainable as in the paper's 2B recipe. One batch of --batch records at real length, as a RefCOCO record is: an image
of N merged patches (N = 1024 by default: 896 x 896 pixels), one of the paper's questions (Prompt S1) and its answer
with one `<|seg|>` or three (three objects named, one answer sentence each), encoded by the training data path
(`encode_record`, `STAMPCollator`), random masks on the patch grid. A step is forward + backward of the loss (no
optimizer step: it is the same for all three). Per configuration, each step runs once to warm up, then
--repeats alternating rounds; times are medians with their range.

  (a) ours: `model(**batch)`, the model's real loss path (`mask_labels` given): the sequence once, every `<|seg|>`'s N
      placeholders appended and attended block by block;
  (b) the official training step restated (`stamp_hf.testing.official.official_training_loss`, from
      train/seg_trainer.py of HKUST-LongGroup/STAMP): a language-model pass over the batch with its labels, then a
      mask-pass batch with one row per `<|seg|>` (the record's tokens through that `<|seg|>` + N `<|mask|>`), the image
      encoded again for each row, under the dense (rows, 1, L, L) hybrid 4D mask its model builds (causal, `<|mask|>`
      queries see every non-pad key). Assumed: the mask as create_causal_mask builds it for sdpa (the official runs
      flash_attention_2, which ignores the mask and so trains causal placeholders; flash_attention_2 does not run
      here), the model's BCE / Dice weights (the official 0.3 / 0.7 costs the same), and none of its per-step extras
      (torch.cuda.empty_cache, a matplotlib figure saved on rank 0, trl's token-accuracy metrics). Its loss is checked
      against (a) here (column |b-a|/a); tests/test_training_forward.py checks logits and gradients;
  (c) the ideal: a plain causal fine-tuning step over as many tokens (each record's tokens, then N tokens per
      `<|seg|>`; `plain_causal_training_loss`): the backbone's own forward, its causal mask, the same heads and losses.

Prints ms per step, samples/s, the peak memory a step adds over the loaded model and its gradients (CUDA: the
allocator's peak; CPU: the resident-set peak sampled every millisecond in a child process with a fixed mmap
threshold, one step of each after a warm-up step), and the ratios ours/ideal (target <= 1.1 in time and memory) and
official/ours (target >= 1.5). Writes everything to --json.

Run: .venv/bin/python benchmarks/train_speed.py [--text-layers 1] [--vision-layers 1] [--n 1024] [--segs 1 3]
     [--batch 2] [--repeats 3] [--checkpointing off on] [--device cpu|cuda] [--dtype float32|bfloat16]
     [--json benchmarks/results/train_speed_cpu.json]    (--quick: N = 256, batch 1, 2 rounds: a quick look)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from speed import (GRIDS, MEMORY_CHILD_ENV, holds, machine, paired_ratio, peak_added, qwen2_vl_2b_config, summary,
                   timed_rounds)
from stamp_hf.data import STAMPCollator, encode_record
from stamp_hf.modeling_stamp import STAMP_MODELS
from stamp_hf.prompts import RES_ANSWERS, RES_QUESTIONS
from stamp_hf.testing import tiny_processor, tiny_tokenizer
from stamp_hf.testing.official import official_training_loss, plain_causal_training_loss

CELL = 28  # pixels per merged patch (Qwen2-VL)
OBJECTS = ("cat on the left", "dog under the table", "person in the red coat")
TARGETS = {"ours/ideal": 1.1, "official/ours": 1.5}
STEPS = {
    "ours": lambda model, batch: model(**batch).loss,
    "official": lambda model, batch: official_training_loss(model, batch)[0],
    "ideal": lambda model, batch: plain_causal_training_loss(model, batch)[0],
}


def build(args):
    tokenizer = tiny_tokenizer()
    config = qwen2_vl_2b_config(tokenizer, args.text_layers, args.vision_layers, args.vocab_size,
                                min_placeholders=args.n, max_placeholders=args.n)
    torch.manual_seed(0)
    model = STAMP_MODELS[config.model_type](config).train().to(args.device, getattr(torch, args.dtype))
    return model, tiny_processor(tokenizer, args.n, args.n, patch_size=CELL // 2)


def referring_batch(model, processor, args, segs: int) -> dict:
    """--batch records of real length: an image of N merged patches, a Prompt S1 question naming `segs` objects and
    its answer (one sentence with a `<|seg|>` per object), random masks on the patch grid; collated and on device."""
    height, width = GRIDS[args.n]
    objects = OBJECTS[:segs]
    named = objects[0] if segs == 1 else ", ".join(objects[:-1]) + " and " + objects[-1]
    messages = [{"role": "user", "content": RES_QUESTIONS[0].format(named)},
                {"role": "assistant", "content": " ".join(RES_ANSWERS[k].format(o) for k, o in enumerate(objects))}]
    items = []
    for record in range(args.batch):
        pixels = np.random.RandomState(record).randint(0, 256, (height * CELL, width * CELL, 3), dtype=np.uint8)
        item = encode_record(processor, Image.fromarray(pixels), messages)
        if processor.num_placeholders(item["image_grid_thw"][0]) != args.n:
            raise SystemExit(f"the processor made {processor.num_placeholders(item['image_grid_thw'][0])} placeholders, not {args.n}")
        item["mask_labels"] = (torch.rand(segs, height, width, generator=torch.Generator().manual_seed(record)) > 0.5).float()
        items.append(item)
    batch = STAMPCollator(processor)(items)
    batch = {key: value if key == "mask_labels" else value.to(args.device) for key, value in batch.items()}
    batch["mask_labels"] = [labels.to(args.device) for labels in batch["mask_labels"]]
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    return batch


def set_checkpointing(model, on: bool) -> None:
    if on:
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()


def training_step(model, batch, name) -> float:
    """Forward + backward of one step's loss (gradients accumulate: no optimizer, no zeroing); returns the loss."""
    loss = STEPS[name](model, batch)
    loss.backward()
    return loss.item()


def configurations(args):
    return [(segs, checkpointing) for segs in args.segs for checkpointing in args.checkpointing]


def speed_rows(model, processor, args):
    rows = []
    for segs, checkpointing in configurations(args):
        batch = referring_batch(model, processor, args, segs)
        set_checkpointing(model, checkpointing == "on")
        losses = warm_up(model, batch)
        ran = [name for name in STEPS if losses[name] is not None]
        difference = None
        if losses["ours"] is not None and losses["official"] is not None:
            difference = abs(losses["official"] - losses["ours"]) / abs(losses["ours"])
            if difference > args.tolerance:
                message = f"the official step's loss differs from ours by {difference:.1e} ({segs} <|seg|>)"
                if args.dtype == "float32":
                    raise SystemExit(message)
                print(f"WARNING: {message}, over {args.tolerance:g}")
        calls = {name: (lambda name=name: training_step(model, batch, name), args.repeats) for name in ran}
        times = timed_rounds(calls, args.repeats, args.device)
        text_len = batch["input_ids"].shape[1]
        row = {"segs": segs, "checkpointing": checkpointing, "batch": args.batch, "text_tokens": text_len,
               "ideal_tokens": text_len + segs * args.n, "losses": losses, "loss_difference_official": difference}
        row.update({name: summary(times[name], 1) if name in times else None for name in STEPS})
        row["samples_per_s"] = {name: args.batch / (row[name]["median_ms"] / 1e3) for name in ran}
        row["time_ratios"] = ratios(row, lambda name: row[name], paired_ratio)
        if args.device == "cuda" and not args.skip_memory:
            row["peak_mib"] = step_peaks(model, batch, ran)
        rows.append(row)
        print_time_row(row, len(rows) == 1)
    set_checkpointing(model, False)
    return rows


def warm_up(model, batch) -> dict:
    """One step of each, its loss; None for a step the accelerator has no memory for (the others still run)."""
    losses = {}
    for name in STEPS:
        try:
            losses[name] = training_step(model, batch, name)
        except torch.OutOfMemoryError:
            losses[name] = None
            model.zero_grad(set_to_none=False)
            torch.cuda.empty_cache()
            print(f"out of memory: the {name} step ({torch.cuda.get_device_name()})", flush=True)
    return losses


def ratios(row, figure, divide) -> dict:
    """ours/ideal and official/ours of the steps' figures, None where a step did not run."""
    pairs = {"ours/ideal": ("ours", "ideal"), "official/ours": ("official", "ours")}
    return {key: divide(figure(top), figure(bottom)) if row[top] and row[bottom] else None
            for key, (top, bottom) in pairs.items()}


def step_peaks(model, batch, names) -> dict:
    """MiB each step adds at its peak (`peak_added`), one step each, in this order."""
    return {name: peak_added(lambda name=name: training_step(model, batch, name), model.device.type) / 2**20
            for name in names}


def fmt(value, spec) -> str:
    return "-" if value is None else format(value, spec)


def print_time_row(row, header: bool):
    if header:
        print(f"{'<|seg|>':>7} {'ckpt':>4} {'tokens':>11} {'(a) ours ms':>18} {'(b) official ms':>18} "
              f"{'(c) ideal ms':>18} {'a samples/s':>11} {'b/a':>5} {'a/c':>5} {'|b-a|/a':>8}")
    cell = lambda s: "out of memory" if s is None else f"{s['median_ms']:.0f} ({s['min_ms']:.0f}-{s['max_ms']:.0f})"  # noqa: E731
    print(f"{row['segs']:>7} {row['checkpointing']:>4} {row['text_tokens']:>5}/{row['ideal_tokens']:>5} "
          f"{cell(row['ours']):>18} {cell(row['official']):>18} {cell(row['ideal']):>18} "
          f"{fmt(row['samples_per_s'].get('ours'), '.3f'):>11} {fmt(row['time_ratios']['official/ours'], '.2f'):>5} "
          f"{fmt(row['time_ratios']['ours/ideal'], '.3f'):>5} {fmt(row['loss_difference_official'], '.1e'):>8}",
          flush=True)


def memory_rows(args, rows):
    """CPU: each configuration's peaks in a child process (`--memory-only SEGS,CHECKPOINTING`)."""
    for row in rows:
        command = [sys.executable, __file__, "--memory-only", f"{row['segs']},{row['checkpointing']}"] + [
            item for key in ("text_layers", "vision_layers", "n", "batch", "device", "dtype", "vocab_size")
            if getattr(args, key) is not None
            for item in (f"--{key.replace('_', '-')}", str(getattr(args, key)))
        ]
        result = subprocess.run(command, capture_output=True, text=True, env=MEMORY_CHILD_ENV)
        if result.returncode:
            raise SystemExit(f"the memory child for {row['segs']} <|seg|>, checkpointing {row['checkpointing']} "
                             f"failed:\n{result.stderr[-2000:]}")
        row["peak_mib"] = json.loads(result.stdout.strip().splitlines()[-1])


def memory_child(args):
    """One configuration's peaks in a fresh process: one warm-up step of ours (it allocates the gradients and what a
    process's first step allocates once, which would otherwise count as ours), then one step of each."""
    segs, checkpointing = args.memory_only.split(",")
    model, processor = build(args)
    batch = referring_batch(model, processor, args, int(segs))
    set_checkpointing(model, checkpointing == "on")
    training_step(model, batch, "ours")
    print(json.dumps(step_peaks(model, batch, list(STEPS))))


def print_memory(rows):
    print("peak memory a step adds over the loaded model and its gradients:")
    print(f"{'<|seg|>':>7} {'ckpt':>4} {'(a) ours MiB':>13} {'(b) official MiB':>17} {'(c) ideal MiB':>14} "
          f"{'b/a':>5} {'a/c':>5}")
    for row in rows:
        peak = row["peak_mib"]
        row["memory_ratios"] = ratios(row, lambda name: peak[name], lambda top, bottom: top / bottom)
        print(f"{row['segs']:>7} {row['checkpointing']:>4} {fmt(peak.get('ours'), '.0f'):>13} "
              f"{fmt(peak.get('official'), '.0f'):>17} {fmt(peak.get('ideal'), '.0f'):>14} "
              f"{fmt(row['memory_ratios']['official/ours'], '.2f'):>5} {fmt(row['memory_ratios']['ours/ideal'], '.3f'):>5}")


def print_verdicts(rows):
    for row in rows:
        checks = []
        for kind in ("time", "memory"):
            for key, value in row.get(f"{kind}_ratios", {}).items():
                if value is not None:
                    op = "<=" if key == "ours/ideal" else ">="
                    checks.append(f"{kind} {key} {value:.3f} {op} {TARGETS[key]}")
        verdicts = ["met" if holds(check.split(" ", 1)[1]) else "NOT met" for check in checks]
        print(f"{row['segs']} <|seg|>, checkpointing {row['checkpointing']}: "
              + "; ".join(f"{c}: {v}" for c, v in zip(checks, verdicts)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-layers", type=int, default=1)
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--n", type=int, default=1024, choices=sorted(GRIDS), help="placeholders (merged patches)")
    parser.add_argument("--segs", type=int, nargs="+", default=[1, 3], choices=range(1, len(OBJECTS) + 1))
    parser.add_argument("--batch", type=int, default=2, help="records per step")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds after the warm-up (default 3; --quick: 2)")
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--vocab-size", type=int, default=None, help="embedding rows (default: the tiny tokenizer's 512)")
    parser.add_argument("--tolerance", type=float, default=None, help="max |official - ours| / ours loss (default 1e-4; bf16: 0.05, a warning)")
    parser.add_argument("--quick", action="store_true", help="N = 256, batch 1, 2 rounds: a quick look, not the figures")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", default=None, help="default benchmarks/results/train_speed_cpu.json (--quick: train_speed_quick_cpu.json)")
    parser.add_argument("--memory-only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_only:  # child process: one configuration's peaks
        memory_child(args)
        return
    if args.quick:
        args.n, args.batch = 256, 1
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.json is None:
        args.json = f"benchmarks/results/train_speed{'_quick' if args.quick else ''}_cpu.json"
    if args.tolerance is None:
        args.tolerance = 1e-4 if args.dtype == "float32" else 0.05

    print(f"STAMP training step at Qwen2-VL-2B layer shapes, {args.text_layers} text / {args.vision_layers} vision "
          f"layers (the real model: 28 / 32), random weights, {args.dtype}, sdpa; N = {args.n}, batch {args.batch}; "
          f"{machine(args)}")
    print(f"ms per step (forward + backward): median (min-max) of {args.repeats} alternating rounds after a warm-up; "
          "tokens: per record, text / text + N per <|seg|>; b/a, a/c: medians of same-round ratios")
    model, processor = build(args)
    rows = speed_rows(model, processor, args)
    del model
    if not args.skip_memory:
        if args.device != "cuda":
            memory_rows(args, rows)
        print_memory(rows)
    print_verdicts(rows)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    partial = args.json + ".partial"
    with open(partial, "w") as handle:
        json.dump({"machine": machine(args), "args": {k: v for k, v in vars(args).items() if k != "memory_only"},
                   "rows": rows}, handle, indent=1)
    os.replace(partial, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
