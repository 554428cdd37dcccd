"""Train the demo STAMP on the synthetic referring-segmentation benchmark and reproduce the Table 6 ablation at its scale.

From a clean checkout (CPU is enough):

    .venv/bin/python benchmarks/demo_model.py                 # data, 3 variants x 3 seeds, prints the table
    .venv/bin/python benchmarks/demo_model.py --ship demo_model   # also trains the demo model (longer) and writes it
    .venv/bin/python benchmarks/demo_model.py --table-only        # the table of the runs done so far

Each run starts from a randomly initialised demo STAMP (stamp_hf.demo) and trains with stamp_hf.training.train, the
same path as `stamp-hf train`, for the same number of steps. Variants (the paper's Table 6 rows):
  stamp     the paper's design: placeholders attend bidirectionally, each fused with its patch feature
  causal    "w/o A_hyb": placeholders attend causally among themselves
  nofusion  "w/o E_mask": placeholders are embed(<|mask|>) alone, no patch feature
Test metrics: cIoU / gIoU (stamp_hf.evaluation) on the test split's segmentation requests (referring, multi-object and
no-object), and exact-answer accuracy on its VQA questions. Finished runs are kept under --out and not redone, so the
variants can be trained in separate processes (--variants / --seeds) and the table printed afterwards.
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

from stamp_hf.demo import all_shapes_baseline, build_demo_model, demo_tokenizer, evaluate_demo, write_demo_card
from stamp_hf.synthetic import write_dataset
from stamp_hf.training import train

VARIANTS = {
    "stamp": ("STAMP (bidirectional placeholders + patch-feature fusion)", {}),
    "causal": ("w/o A_hyb: causal placeholders", {"placeholder_attention": "causal"}),
    "nofusion": ("w/o E_mask: no patch-feature fusion", {"fuse_patch_features": False}),
}
TRAINING = dict(
    per_device_train_batch_size=8,
    learning_rate=3e-4,
    warmup_steps=0.03,
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


def run_one(out: Path, data: dict, variant: str, seed: int, steps: int, tokenizer, prefix: str = "") -> dict:
    """Train one variant from seed `seed` and evaluate it; cached as out/runs/<prefix><variant>-<seed>/result.json."""
    run = out / "runs" / f"{prefix}{variant}-{seed}"
    result_file = run / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    if run.exists():
        shutil.rmtree(run)  # an interrupted run starts over
    model, processor = build_demo_model(seed=seed, tokenizer=tokenizer, **VARIANTS[variant][1])
    model.save_pretrained(run / "init")
    processor.save_pretrained(run / "init")
    start = time.perf_counter()
    trainer = train(
        dict(
            model=str(run / "init"),
            data=str(data["train"]),
            output_dir=str(run / "model"),
            trust_remote_code=True,
            training=dict(TRAINING, max_steps=steps, seed=seed),
        )
    )
    train_seconds = time.perf_counter() - start
    shutil.rmtree(run / "init")
    metrics = evaluate_demo(run / "model", data["test"], run / "eval")
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="data, runs and results go here")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per ablation run (batch 8)")
    parser.add_argument("--train-samples", type=int, default=12000)
    parser.add_argument("--test-samples", type=int, default=300)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest on shared CPUs)")
    parser.add_argument("--ship", type=Path, help="train the demo model (stamp, seed 0, --ship-steps) and write it here")
    parser.add_argument("--ship-steps", type=int, default=600)
    parser.add_argument("--table-only", action="store_true", help="train nothing: the table of the runs already done")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data_dir = args.out / "data"
    if not (data_dir / "test.jsonl").exists():
        print(f"writing the synthetic data to {data_dir} ...", flush=True)
        write_dataset(data_dir, train=args.train_samples, val=0, test=args.test_samples)
    data = {"train": data_dir / "train.jsonl", "test": data_dir / "test.jsonl"}
    tokenizer = demo_tokenizer()
    results = []
    for variant in args.variants:
        for seed in args.seeds:
            done = args.out / "runs" / f"{variant}-{seed}" / "result.json"
            if args.table_only and not done.exists():
                print(f"-- {variant} seed {seed}: not run", flush=True)
                continue
            print(f"== {variant} seed {seed}", flush=True)
            result = run_one(args.out, data, variant, seed, args.steps, tokenizer)
            print(json.dumps(result), flush=True)
            results.append(result)
    print(f"\nTest split: {args.test_samples} samples (seeds never used in training); {args.steps} steps of batch 8;")
    print(f"CPU: {os.cpu_count()} cores visible, {args.threads} torch thread(s) per run; Python {sys.version.split()[0]}\n")
    print(table(results))
    baseline = all_shapes_baseline(data["test"])
    print(f"\nLanguage-blind baseline (every shape masked, whatever the request): cIoU {baseline['cIoU']:.1f}, "
          f"gIoU {baseline['gIoU']:.1f}")
    if args.ship:
        print(f"== demo model: stamp seed 0, {args.ship_steps} steps", flush=True)
        shipped = run_one(args.out, data, "stamp", 0, args.ship_steps, tokenizer, prefix="ship-")
        print(json.dumps(shipped), flush=True)
        write_demo_card(args.out / "runs" / "ship-stamp-0" / "model", args.ship, shipped, table(results), args.steps, baseline)
        print(f"\ndemo model written to {args.ship}")


if __name__ == "__main__":
    main()
