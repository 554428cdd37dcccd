"""Does a demo model know the questions it was trained on? VQA exact match per kind (scoring.evaluate_conversations,
the evaluation's own path) on question records the build's last `stamp-hf train` stages trained on (the fresh
conversations' seeds, drawn again: the same records) beside as many held-out ones (the test split and the drawn set),
for each model, side by side. Trained-on far above held-out: overfitting (more data is the lever); both alike and
low: the model has not learnt them (capacity, steps or features are the lever).

    .venv/bin/python benchmarks/demo_fit.py demo_model runs/demo/OTHER/model --records 120

Figures go to --results.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from stamp_hf.synthetic.build import CONVERSATION_SEEDS
from stamp_hf.synthetic.drawn import write_held_out
from stamp_hf.synthetic.scenes import write_split
from stamp_hf.synthetic.scoring import evaluate_conversations


def question_sets(folder: Path, records: int) -> dict[str, Path]:
    """{set name: .jsonl} of question-only records: "trained-on" (the question records among the conversations
    stage's first 4 x `records` seeds: about `records`, a quarter of the generator's samples being questions), "test"
    and "drawn" (`records` each, from their start)."""
    return {"trained-on": write_split(folder / "trained-on", "train", 4 * records, start=CONVERSATION_SEEDS,
                                      tasks=("vqa",), version="v3"),
            **{name: write_held_out(folder / name, name, records, 0, task="vqa") for name in ("test", "drawn")}}


def main(argv=None):
    from transformers import AutoModel, AutoProcessor

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="demo model folders")
    parser.add_argument("--records", type=int, default=120, help="records per set (about as many trained-on ones)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/demo_fit_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = dict(records=args.records, threads=args.threads, models={})
    with tempfile.TemporaryDirectory() as folder:
        sets = question_sets(Path(folder), args.records)
        for model_folder in args.models:
            model = AutoModel.from_pretrained(model_folder, trust_remote_code=True).eval()
            processor = AutoProcessor.from_pretrained(model_folder, trust_remote_code=True)
            start = time.perf_counter()
            scores = {name: evaluate_conversations(model, processor, jsonl) for name, jsonl in sets.items()}
            results["models"][str(model_folder)] = dict(scores, seconds=round(time.perf_counter() - start, 1))
    kinds = sorted({kind for model in results["models"].values() for kind in model["trained-on"]["vqa_by_kind"]})
    header = [f"{model} {name}" for model in results["models"] for name in sets]
    print("| VQA exact % | " + " | ".join(header) + " |\n|---|" + "---|" * len(header))
    rows = [("all (turns)", lambda s: f"{s['vqa_exact']:.1f} ({s['vqa_samples']})")]
    rows += [(kind, lambda s, k=kind: "-" if s["vqa_by_kind"].get(k) is None else f"{s['vqa_by_kind'][k]:.1f}")
             for kind in kinds]
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(model[name]) for model in results["models"].values()
                                          for name in sets) + " |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(dict(results, command=" ".join(sys.argv)), indent=2))


if __name__ == "__main__":
    main()
