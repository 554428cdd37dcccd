"""Train the demo STAMP on the synthetic referring-segmentation benchmark and reproduce the Table 6 ablation at its scale.

From a clean checkout (CPU is enough):

    .venv/bin/python benchmarks/demo_model.py                     # data, vision stage, 3 variants x 3 seeds, the table
    .venv/bin/python benchmarks/demo_model.py --ship demo_model   # also trains the demo model (longer, then a
                                                                  # fine-tune) and writes it
    .venv/bin/python benchmarks/demo_model.py --table-only        # the table of the runs done so far

Stages, all on 128 px scenes (a 16 x 16 mask grid):
  vision    the stand-in for Qwen2-VL's pretrained vision tower (demo_tools.pretrain_vision_tower): the ViT learns
            every patch's shape kind, colour and size from labelled scenes, no language. Run once, shared by every run.
  STAMP     each run: a demo STAMP whose language model is randomly initialised from the run's seed, with that vision
            tower, trained by stamp_hf.training.train (the path of `stamp-hf train`), the vision tower frozen and the
            mask loss on the upsampled masks (mask_loss_resolution="image").
  fine-tune the demo model only (--ship): the STAMP run trained on at a lower learning rate, with L_text weighted
            --finetune-text-weight times, so the few tokens that decide an answer count against the mask loss.
Variants (the paper's Table 6 rows), each trained for the same number of steps:
  stamp     the paper's design: placeholders attend bidirectionally, each fused with its patch feature
  causal    "w/o A_hyb": placeholders attend causally among themselves
  nofusion  "w/o E_mask": placeholders are embed(<|mask|>) alone, no patch feature
Test metrics: cIoU / gIoU (stamp_hf.evaluation) on the test split's segmentation requests (referring, multi-object and
no-object), per request kind, and exact-answer accuracy on its VQA questions. Finished runs are kept under --out and
not redone, so variants can be trained in separate processes (--variants / --seeds) and the table printed afterwards.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoProcessor

from demo_tools import (
    CEILING_TARGETS,
    DEMO_IMAGE_SIZE,
    all_shapes_baseline,
    build_demo_model,
    demo_tokenizer,
    evaluate_demo,
    grid_ceiling,
    pretrain_vision_tower,
    write_demo_card,
)
from stamp_hf.modeling_stamp import STAMPModel
from stamp_hf.synthetic import write_split
from stamp_hf.training import train

VARIANTS = {
    "stamp": ("STAMP (bidirectional placeholders + patch-feature fusion)", {}),
    "causal": ("w/o A_hyb: causal placeholders", {"placeholder_attention": "causal"}),
    "nofusion": ("w/o E_mask: no patch-feature fusion", {"fuse_patch_features": False}),
}
TRAINING = dict(
    per_device_train_batch_size=8,
    learning_rate=1e-3,
    adam_beta2=0.95,
    warmup_steps=0.05,
    lr_scheduler_type="cosine",
    weight_decay=0.0,
    max_grad_norm=1.0,
    activation_checkpointing=False,
    save_strategy="no",
    logging_steps=20,
    dataloader_num_workers=0,
    num_train_epochs=1,
    report_to="none",
)
FINETUNE = dict(learning_rate=3e-4, seed=1)  # the demo model's fine-tune stage, from its STAMP run


def vision_stage(out: Path, steps: int, tokenizer) -> dict:
    """The pretrained vision tower every STAMP run starts from; cached as out/runs/vision-<steps>."""
    run = out / "runs" / f"vision-{steps}"
    if (run / "result.json").exists():
        return json.loads((run / "result.json").read_text())
    shutil.rmtree(run, ignore_errors=True)  # an interrupted run starts over
    model, processor = build_demo_model(seed=0, tokenizer=tokenizer)
    start = time.perf_counter()
    history = pretrain_vision_tower(model, processor, steps, log=lambda entry: print(json.dumps(entry), flush=True))
    seconds = time.perf_counter() - start
    model.save_pretrained(run / "model")
    result = dict(steps=steps, train_seconds=seconds, threads=torch.get_num_threads(), history=history,
                  model=str(run / "model"))
    (run / "result.json").write_text(json.dumps(result, indent=2))
    return result


def run_one(out: Path, data_dir: Path, variant: str, seed: int, steps: int, tokenizer, name: str, vision,
            start=None, text_loss_weight=None, learning_rate=None) -> dict:
    """Train `variant` from seed `seed` on data_dir/train.jsonl and evaluate it on data_dir/test.jsonl; cached as
    out/runs/<name>/result.json. The model is a fresh one with the pretrained vision tower of the folder `vision`, or
    the trained STAMP in the folder `start` (the fine-tune stage), trained with `text_loss_weight` and `learning_rate`
    where given."""
    run = out / "runs" / name
    result_file = run / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    if run.exists():
        shutil.rmtree(run)  # an interrupted run starts over
    if start is None:
        model, processor = build_demo_model(seed=seed, tokenizer=tokenizer, **VARIANTS[variant][1])
        model.model.visual.load_state_dict(STAMPModel.from_pretrained(vision).model.visual.state_dict())
        model.save_pretrained(run / "init")
        processor.save_pretrained(run / "init")
    training = dict(TRAINING, max_steps=steps, seed=seed)
    if learning_rate is not None:
        training["learning_rate"] = learning_rate
    start_time = time.perf_counter()
    trainer = train(
        dict(
            model=str(run / "init" if start is None else start),
            data=str(data_dir / "train.jsonl"),
            output_dir=str(run / "model"),
            trust_remote_code=True,
            freeze_vision_tower=True,
            text_loss_weight=text_loss_weight,
            training=training,
        )
    )
    train_seconds = time.perf_counter() - start_time
    shutil.rmtree(run / "init", ignore_errors=True)
    metrics = evaluate_demo(run / "model", data_dir / "test.jsonl", run / "eval")
    result = dict(
        variant=variant,
        seed=seed,
        steps=steps,
        start=None if start is None else str(start),
        learning_rate=training["learning_rate"],
        text_loss_weight=1.0 if text_loss_weight is None else text_loss_weight,
        train_seconds=train_seconds,
        last_logged_losses=next(
            ({k: entry[k] for k in ("loss", "text_loss", "mask_loss")} for entry in reversed(trainer.state.log_history)
             if "mask_loss" in entry),
            None,
        ),
        threads=torch.get_num_threads(),
        **metrics,
    )
    result_file.write_text(json.dumps(result, indent=2))
    return result


def spread(values) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def table(results: list[dict]) -> str:
    lines = [
        "| variant | seeds | cIoU | cIoU per seed | gIoU | VQA exact | `<|seg|>` on seg requests | no `<|seg|>` on VQA "
        "| train time (min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, (title, _) in VARIANTS.items():
        rows = [r for r in results if r["variant"] == variant]
        if not rows:
            continue
        pick = lambda key: [r[key] for r in rows]  # noqa: E731
        lines.append(
            f"| {title} | {','.join(str(s) for s in pick('seed'))} | {spread(pick('cIoU'))} "
            f"| {' / '.join(f'{v:.1f}' for v in pick('cIoU'))} | {spread(pick('gIoU'))} "
            f"| {spread(pick('vqa_exact'))} | {spread(pick('seg_rate'))} | {spread(pick('no_seg_rate'))} "
            f"| {spread([t / 60 for t in pick('train_seconds')])} |"
        )
    return "\n".join(lines)


def dataset(out: Path, train_samples: int, test_samples: int) -> Path:
    """The synthetic train and test splits at 128 px under out/data (written once)."""
    folder = out / "data"
    if not (folder / "test.jsonl").exists():
        print(f"writing the synthetic data to {folder} ...", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        write_split(folder, "train", train_samples, DEMO_IMAGE_SIZE)
        write_split(folder, "test", test_samples, DEMO_IMAGE_SIZE)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="data, runs and results go here")
    parser.add_argument("--vision-steps", type=int, default=4000, help="steps of the vision stage (batch 16)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per ablation run (batch 8)")
    parser.add_argument("--train-samples", type=int, default=100000)
    parser.add_argument("--test-samples", type=int, default=300)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--ship", type=Path, help="train the demo model (stamp, seed 0, --ship-steps) and write it here")
    parser.add_argument("--ship-steps", type=int, default=6000, help="the demo model's STAMP training steps")
    parser.add_argument("--finetune-steps", type=int, default=4000, help="the demo model's fine-tune steps")
    parser.add_argument("--finetune-text-weight", type=float, default=10.0, help="text_loss_weight when fine-tuning")
    parser.add_argument("--table-only", action="store_true", help="train nothing: the table of the runs already done")
    args = parser.parse_args(argv)
    if args.table_only and args.ship:
        parser.error("--ship trains the demo model; it cannot go with --table-only")
    if args.finetune_steps < 1:
        parser.error(f"--finetune-steps must be at least 1, got {args.finetune_steps}")
    torch.set_num_threads(args.threads)

    tokenizer = demo_tokenizer()
    data = dataset(args.out, args.train_samples, args.test_samples)
    if args.table_only:
        vision = None
    else:
        print(f"== vision stage: {args.vision_steps} steps", flush=True)
        vision = vision_stage(args.out, args.vision_steps, tokenizer)
    results = []
    for variant in args.variants:
        for seed in args.seeds:
            name = f"{variant}-{seed}-{args.steps}"
            if args.table_only and not (args.out / "runs" / name / "result.json").exists():
                print(f"-- {name}: not run", flush=True)
                continue
            print(f"== {name}", flush=True)
            result = run_one(args.out, data, variant, seed, args.steps, tokenizer, name, vision and vision["model"])
            print(json.dumps(result), flush=True)
            results.append(result)
    print(f"\nAblation: {DEMO_IMAGE_SIZE} px scenes, test split of {args.test_samples} samples (seeds never used in "
          f"training), {args.steps} steps of batch 8 per run after the {args.vision_steps}-step vision stage")
    print(f"CPU: {os.cpu_count()} cores visible, {args.threads} torch thread(s) per run; Python {sys.version.split()[0]}\n")
    print(table(results))
    baseline = all_shapes_baseline(data / "test.jsonl")
    print(f"\nLanguage-blind baseline (every shape masked, whatever the request): cIoU {baseline['cIoU']:.1f}, "
          f"gIoU {baseline['gIoU']:.1f}")
    if args.ship:
        if args.ship.exists():
            raise SystemExit(f"{args.ship} already exists; remove it first to replace the demo model")
        print(f"== demo model: stamp seed 0, {args.ship_steps} steps", flush=True)
        stamp_run = run_one(args.out, data, "stamp", 0, args.ship_steps, tokenizer, f"ship-{args.ship_steps}",
                            vision["model"])
        print(json.dumps(stamp_run), flush=True)
        name = f"ship-{args.ship_steps}-finetune-{args.finetune_steps}-tw{args.finetune_text_weight:g}"
        print(f"== demo model: fine-tune, {args.finetune_steps} steps, text_loss_weight {args.finetune_text_weight:g}",
              flush=True)
        shipped = run_one(args.out, data, "stamp", FINETUNE["seed"], args.finetune_steps, tokenizer, name, None,
                          start=args.out / "runs" / f"ship-{args.ship_steps}" / "model",
                          text_loss_weight=args.finetune_text_weight, learning_rate=FINETUNE["learning_rate"])
        print(json.dumps(shipped), flush=True)
        model_folder = args.out / "runs" / name / "model"
        processor = AutoProcessor.from_pretrained(model_folder, trust_remote_code=True)
        ceilings = {targets: grid_ceiling(data / "test.jsonl", processor, targets) for targets in CEILING_TARGETS}
        print("Best possible cIoU on the 16 x 16 grid: " + ", ".join(
            f"{targets} targets {ceiling['cIoU']:.1f}" for targets, ceiling in ceilings.items()))
        write_demo_card(model_folder, args.ship, stamp_run, shipped, vision, table(results), args.steps, baseline,
                        ceilings)
        print(f"\ndemo model written to {args.ship}")


if __name__ == "__main__":
    main()
