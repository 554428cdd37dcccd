"""Seed the demo build's stage caches from the committed build summary and the shipped demo model, so that the build
(`benchmarks/demo_model.py`, python -m stamp_hf.synthetic.build) trains only stages that come after the shipped model:
hours of CPU less than a rebuild from nothing.

    .venv/bin/python -m stamp_hf.synthetic.seed_caches [--out runs/demo] [--summary FILE] [--model demo_model]

Seeded: the vision, dialogue, base-answers (when the summary has it) and every `stamp-hf train` stage's result.json
as the summary recorded them (each marked "seeded_from"), the last trained stage's model folder (a copy of the
shipped model), the vision stage's model (seed_vision_base: what benchmarks/demo_dialogue.py starts from) and the
ablation runs' records and evaluations. Not seeded: the data stages and the references, which the build draws and
measures again (they are deterministic, so their figures must come out as the summary has them), and the dialogue
stage's model: an ablation run the summary does not hold makes the build build the base again
(build.unseed_base_for_ablation). Refused where a seeded folder exists.
"""

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from .build import ablation_stage_name, rebalance_key, train_stage_names
from .stages import rebalance_rounds


def stage_records(summary: dict) -> dict[str, dict]:
    """{stage folder name: its result.json} for every trained stage of the summary, in the build's naming."""
    args = summary["args"]  # as the build's summary stores them: strings
    names = train_stage_names(args["v2_steps"], args["steps"], args.get("conversation_steps", 0),
                              json.loads(args.get("rebalance_steps", "0")))  # "5000" or "[5000, 6000]"
    trained = dict(stamp_v2=summary["stamp_v2"], stamp=summary["stamp"],
                   conversations=(summary.get("conversations") or {}).get("train"),
                   **{rebalance_key(index): record for index, record in enumerate(rebalance_rounds(summary))})
    answers = {"base-answers": summary["base_answers"]} if summary.get("base_answers") else {}
    return {"base-vision": summary["vision"], "base": summary["dialogue"], **answers,
            **{name: trained[stage] for stage, name in names.items()}}


def seed_vision_base(model: Path, folder: Path) -> Path:
    """The vision stage's model, rebuilt exactly from a shipped demo model (or any later stage's model): the build's
    own start (build_base(seed=0) with the demo tokenizer) with that model's vision tower and merger, which the
    vision stage alone trained (every later stage kept them frozen), saved as the stage saves it."""
    from transformers import AutoModel

    from .stages import build_base, demo_tokenizer, save_base

    base, processor = build_base(seed=0, tokenizer=demo_tokenizer())
    loaded = AutoModel.from_pretrained(model, trust_remote_code=True)  # a STAMP model, or a plain base's Qwen2VLModel
    shipped = getattr(loaded, "model", loaded).visual.state_dict()
    base.model.visual.load_state_dict(shipped)  # strict: the same tower, or an error naming the keys
    return save_base(base, processor, folder)


def seed(out: Path, summary_file: Path, model: Path) -> list[Path]:
    """Write the caches (see the module's docstring) under `out`; the folders written."""
    summary = json.loads(summary_file.read_text())
    commit = subprocess.run(["git", "-C", str(summary_file.resolve().parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "an unknown commit"
    origin = f"{summary_file.name} at {commit}"
    records = stage_records(summary)
    ablation_steps = summary["args"]["ablation_steps"]
    runs = {ablation_stage_name(variant, run["training"]["seed"], ablation_steps): run
            for variant, variant_runs in summary.get("ablation", {}).items() for run in variant_runs}
    folders = [out / name for name in [*records, *runs]]
    taken = [str(f) for f in folders if f.exists()]
    if taken:
        raise SystemExit(f"already there (remove them to seed again): {', '.join(taken)}")
    for name, record in records.items():
        (out / name).mkdir(parents=True)
        (out / name / "result.json").write_text(json.dumps({"seeded_from": origin, **record}, indent=2))
    shutil.copytree(model, out / list(records)[-1] / "model")  # the shipped model is the last stage's
    seed_vision_base(model, out / "base-vision" / "model")
    for name, run in runs.items():
        (out / name / "eval").mkdir(parents=True)
        (out / name / "result.json").write_text(json.dumps({"seeded_from": origin, **run["training"], "log": []},
                                                           indent=2))
        for split in ("test", "drawn"):
            (out / name / "eval" / f"{split}.json").write_text(json.dumps(run[split], indent=2))
    return folders


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m stamp_hf.synthetic.seed_caches",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="the build's --out")
    parser.add_argument("--summary", type=Path, default=Path("benchmarks/results/demo_model_cpu.json"),
                        help="a build's summary (the build writes it to OUT/summary.json)")
    parser.add_argument("--model", type=Path, default=Path("demo_model"), help="the model the summary describes")
    args = parser.parse_args(argv)
    for folder in seed(args.out, args.summary, args.model):
        print("seeded", folder)


if __name__ == "__main__":
    main()
