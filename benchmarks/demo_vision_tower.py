"""Would the demo model learn its questions better if its vision tower trained too? From one trained demo model, the
build's last `stamp-hf train` once more (stamp_hf.synthetic.build.stamp_stage: the v3 data with the referring export
counted twice and the fresh conversations, a fresh schedule), twice side by side with one torch thread each: the ViT
and its merger frozen, as in every build stage, and trained. Both are then scored as the build scores its model
(build.evaluate_both: both held-out sets, every turn) and set beside the starting model's figures.

    .venv/bin/python -m stamp_hf.synthetic.seed_caches          # once: runs/demo's data comes from the build
    .venv/bin/python benchmarks/demo_vision_tower.py --steps 2000 --learning-rate 5e-4

The data stages come from the build's cache under --build-out (made when missing); runs go to --out, figures to
--results. benchmarks/demo_fit.py then tells, per model, trained-on questions from held-out ones.
"""

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from stamp_hf.synthetic import build

ARMS = {"frozen": False, "trained": True}  # arm: whether the vision tower trains
ROWS = [("cIoU", lambda r: r["cIoU"]), ("gIoU", lambda r: r["gIoU"]), ("N-acc %", lambda r: r["N-acc"]),
        ("T-acc %", lambda r: r["T-acc"]), ("VQA exact, every turn %", lambda r: r["conversations"]["vqa_exact"]),
        ("chat: a later segmentation turn, every mask right %", lambda r: r["conversations"]["chat_switch"]),
        ("several targets: every mask right %", lambda r: r["conversations"]["multi_all_right"]),
        ("several targets: labels name the targets %", lambda r: r["conversations"]["multi_labels"])]


def table(columns: dict[str, dict]) -> str:
    """{column title: evaluate_both results} as rows of test / drawn figures."""
    kinds = sorted(next(iter(columns.values()))["test"]["conversations"]["vqa_by_kind"])
    rows = ROWS + [(f"VQA exact, {kind} %", lambda r, k=kind: r["conversations"]["vqa_by_kind"].get(k)) for kind in kinds]
    lines = ["| test / drawn | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for title, value in rows:
        figures = [[value(result[name]) for name in ("test", "drawn")] for result in columns.values()]
        cells = [" / ".join("-" if v is None else f"{v:.1f}" for v in pair) for pair in figures]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("demo_model"), help="the trained demo model to start from")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--out", type=Path, default=Path("runs/demo-vision-tower"))
    parser.add_argument("--build-out", type=Path, default=Path("runs/demo"), help="the build's --out (its data)")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/demo_vision_tower_cpu.json"))
    args = parser.parse_args(argv)
    settings = build.argument_parser().parse_args(["--out", str(args.build_out)])
    build.data_stage(args.build_out, settings, "v3")
    build.conversations_stage(args.build_out, settings.conversation_samples)
    data = build.data_folder(args.build_out, "v3")

    def train(arm: str) -> dict:
        return build.stamp_stage(args.out, arm, data, args.model, args.steps, start_from=args.model.resolve(),
                                 learning_rate=args.learning_rate, threads=1, concurrent_runs=len(ARMS),
                                 repeats=build.REBALANCE_REPEATS, train_vision_tower=ARMS[arm],
                                 extra_data=[str(build.conversations_file(args.build_out).resolve())])

    with ThreadPoolExecutor(len(ARMS)) as pool:
        training = dict(zip(ARMS, pool.map(train, ARMS)))
    torch.set_num_threads(2)
    results = {"start": build.evaluate_both(args.model, data, args.out / "start-eval")}
    results.update({arm: build.evaluate_both(args.out / arm / "model", data, args.out / arm / "eval") for arm in ARMS})
    print(f"{args.steps} more steps from {args.model}, peak learning rate {args.learning_rate:g}, vision tower frozen "
          f"or trained; every record of both held-out sets\n")
    print(table({"start": results["start"], **{f"{arm} ({args.steps} steps, "
                                                 f"{build.train_seconds(training[arm]) / 60:.1f} min)": results[arm]
                                                 for arm in ARMS}}))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(dict(command=" ".join(sys.argv), model=str(args.model), results=results,
                                            training=training), indent=2))


if __name__ == "__main__":
    main()
