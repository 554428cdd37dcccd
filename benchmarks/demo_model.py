"""Rebuild the bundled demo model from a clean checkout and print every table: the results on both held-out sets,
every dialogue turn (VQA per kind, chat switches, several targets) and the paper's Table 6 ablation at this scale.

    .venv/bin/python benchmarks/demo_model.py [--out runs/demo] [--ship /tmp/demo_model] [--seeds 0 1 2]
        [--ablation-steps 2500] [any other option of python -m stamp_hf.synthetic.build]

Every stage is cached under --out, so a stopped run resumes where it stopped. The summary (every figure, every
stage's time) is copied to benchmarks/results/demo_model_cpu.json. `python -m stamp_hf.synthetic.seed_caches` first
seeds the caches from that summary and the shipped model, so that only stages after it train.
"""

import json
import sys
from pathlib import Path

from stamp_hf.synthetic import build

RESULTS = Path(__file__).resolve().parent / "results" / "demo_model_cpu.json"


def main(argv=None):
    summary = build.main(["--ablation", *(sys.argv[1:] if argv is None else argv)])
    RESULTS.write_text(json.dumps(summary, indent=2))
    print(f"\nsummary copied to {RESULTS}")


if __name__ == "__main__":
    main()
