"""Train the demo STAMP on the synthetic referring-segmentation benchmark and reproduce the Table 6 ablation at its scale.

From a clean checkout (CPU is enough):

    .venv/bin/python benchmarks/demo_model.py                     # data, 3 variants x 3 seeds, prints the table
    .venv/bin/python benchmarks/demo_model.py --ship demo_model   # also trains the demo model (longer) and writes it
    .venv/bin/python benchmarks/demo_model.py --table-only        # the table of the runs done so far

Each run starts from a randomly initialised demo STAMP (stamp_hf.demo) and trains with stamp_hf.training.train, the
same path as `stamp-hf train`. Variants (the paper's Table 6 rows), each trained for the same number of steps:
  stamp     the paper's design: placeholders attend bidirectionally, each fused with its patch feature
  causal    "w/o A_hyb": placeholders attend causally among themselves
  nofusion  "w/o E_mask": placeholders are embed(<|mask|>) alone, no patch feature
The ablation runs on 96 px scenes (a 12 x 12 mask grid: cheaper steps, so more of them per minute). The demo model
trains in two stages with the same recipe: first on 96 px scenes, then on 128 px scenes (its 16 x 16 grid).
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

from stamp_hf.demo import (
    DEMO_IMAGE_SIZE,
    all_shapes_baseline,
    build_demo_model,
    demo_tokenizer,
    evaluate_demo,
    grid_ceiling,
    write_demo_card,
)
from stamp_hf.synthetic import write_dataset
from stamp_hf.training import train

VARIANTS = {
    "stamp": ("STAMP (bidirectional placeholders + patch-feature fusion)", {}),
    "causal": ("w/o A_hyb: causal placeholders", {"placeholder_attention": "causal"}),
    "nofusion": ("w/o E_mask: no patch-feature fusion", {"fuse_patch_features": False}),
}
LOW_RES = 96  # px: the ablation's scenes and the demo model's first stage (a 12 x 12 grid, cheaper steps)
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


def run_one(out: Path, data_dir: Path, variant: str, seed: int, steps: int, tokenizer, name: str, init=None) -> dict:
    """Train `variant` from seed `seed` (or go on from the model folder `init`) on data_dir/train.jsonl and evaluate
    it on data_dir/test.jsonl; cached as out/runs/<name>/result.json."""
    run = out / "runs" / name
    result_file = run / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    if run.exists():
        shutil.rmtree(run)  # an interrupted run starts over
    if init is None:
        model, processor = build_demo_model(seed=seed, tokenizer=tokenizer, **VARIANTS[variant][1])
        model.save_pretrained(run / "init")
        processor.save_pretrained(run / "init")
    start = time.perf_counter()
    trainer = train(
        dict(
            model=str(init or run / "init"),
            data=str(data_dir / "train.jsonl"),
            output_dir=str(run / "model"),
            trust_remote_code=True,
            training=dict(TRAINING, max_steps=steps, seed=seed),
        )
    )
    train_seconds = time.perf_counter() - start
    shutil.rmtree(run / "init", ignore_errors=True)
    metrics = evaluate_demo(run / "model", data_dir / "test.jsonl", run / "eval")
    result = dict(
        variant=variant,
        seed=seed,
        steps=steps,
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


def dataset(out: Path, image_size: int, train_samples: int, test_samples: int) -> Path:
    """The synthetic splits at `image_size` under out/data/<image_size>px (written once)."""
    folder = out / "data" / f"{image_size}px"
    if not (folder / "test.jsonl").exists():
        print(f"writing the synthetic data to {folder} ...", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        write_dataset(folder, train=train_samples, val=0, test=test_samples, image_size=image_size)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="data, runs and results go here")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per ablation run (batch 8)")
    parser.add_argument("--ablation-image-size", type=int, default=LOW_RES)
    parser.add_argument("--train-samples", type=int, default=32000)
    parser.add_argument("--test-samples", type=int, default=300)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--ship", type=Path, help="train the demo model (stamp, seed 0, --ship-steps) and write it here")
    parser.add_argument(
        "--ship-steps", type=int, nargs=2, default=[3000, 8000], metavar=("STEPS_96PX", "STEPS_128PX"),
        help="the demo model's two stages: steps on 96 px scenes, then on 128 px scenes",
    )
    parser.add_argument("--table-only", action="store_true", help="train nothing: the table of the runs already done")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = demo_tokenizer()
    ablation_data = dataset(args.out, args.ablation_image_size, args.train_samples, args.test_samples)
    results = []
    for variant in args.variants:
        for seed in args.seeds:
            name = f"{variant}-{seed}"
            if args.table_only and not (args.out / "runs" / name / "result.json").exists():
                print(f"-- {name}: not run", flush=True)
                continue
            print(f"== {name}", flush=True)
            result = run_one(args.out, ablation_data, variant, seed, args.steps, tokenizer, name)
            print(json.dumps(result), flush=True)
            results.append(result)
    print(f"\nAblation: {args.ablation_image_size} px scenes, test split of {args.test_samples} samples (seeds never "
          f"used in training), {args.steps} steps of batch 8 per run")
    print(f"CPU: {os.cpu_count()} cores visible, {args.threads} torch thread(s) per run; Python {sys.version.split()[0]}\n")
    print(table(results))
    baseline = all_shapes_baseline(ablation_data / "test.jsonl", args.ablation_image_size)
    print(f"\nLanguage-blind baseline (every shape masked, whatever the request): cIoU {baseline['cIoU']:.1f}, "
          f"gIoU {baseline['gIoU']:.1f}")
    if args.ship:
        if args.ship.exists():
            raise SystemExit(f"{args.ship} already exists; remove it first to replace the demo model")
        low, high = args.ship_steps
        print(f"== demo model: stamp seed 0, {low} steps at 96 px, then {high} steps at 128 px", flush=True)
        stage1 = run_one(args.out, dataset(args.out, LOW_RES, args.train_samples, args.test_samples), "stamp", 0, low,
                         tokenizer, f"ship-96px-{low}")
        ship_data = dataset(args.out, DEMO_IMAGE_SIZE, args.train_samples, args.test_samples)
        stage2 = run_one(args.out, ship_data, "stamp", 0, high, tokenizer, f"ship-128px-{high}",
                         init=args.out / "runs" / f"ship-96px-{low}" / "model")
        threads = {stage1["threads"], stage2["threads"]}
        shipped = dict(stage2, steps=f"{low} (96 px) + {high} (128 px)",
                       train_seconds=stage1["train_seconds"] + stage2["train_seconds"],
                       threads=stage2["threads"] if len(threads) == 1
                       else f"{stage1['threads']} (96 px stage) / {stage2['threads']} (128 px stage)")
        print(json.dumps(shipped), flush=True)
        model_folder = args.out / "runs" / f"ship-128px-{high}" / "model"
        processor = AutoProcessor.from_pretrained(model_folder, trust_remote_code=True)
        ceilings = {
            name: grid_ceiling(ship_data / "test.jsonl", processor, soft=name == "soft") for name in ("binary", "soft")
        }
        print("Best possible cIoU on the 16 x 16 grid: binary targets {:.1f}, fractions {:.1f}".format(
            ceilings["binary"]["cIoU"], ceilings["soft"]["cIoU"]))
        write_demo_card(model_folder, args.ship, shipped, table(results), args.steps,
                        all_shapes_baseline(ship_data / "test.jsonl"), ceilings)
        print(f"\ndemo model written to {args.ship}")


if __name__ == "__main__":
    main()
