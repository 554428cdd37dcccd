"""Measure the demo model on the very samples tests/test_demo_model.py checks, and print each figure beside the floor
tests/fixtures/demo_floors.json sets for it (and the margin), so that floors are set a few points under what was
measured and the fixture's "measured" entries are this script's output, not copied by hand.

    .venv/bin/python benchmarks/demo_floors.py [--model demo_model] [--write]

--write puts the measured figures into the fixture's "measured" entries (the floors themselves are set by hand).
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

from stamp_hf.synthetic.drawn import write_held_out
from stamp_hf.synthetic.scoring import drawn_scene_answer, evaluate_conversations
from stamp_hf.synthetic.stages import evaluate_demo, language_blind_baseline

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "demo_floors.json"
EXAMPLE_REQUEST = "Please segment the red circle and the yellow star."


def measure_set(model, processor, name: str, floors: dict, folder: Path) -> tuple[dict, dict]:
    """(first-turn figures of the mixed records, dialogue figures of the questions, chats and several-target
    requests) of held-out set `name`, on the tests' samples."""
    start, dialogue = floors["start"], floors["dialogue"]
    mixed = write_held_out(folder / "mixed", name, floors["samples"], start)
    metrics = evaluate_demo(model, processor, mixed, folder / "eval")
    first = {key: round(metrics[key], 1) for key in ("cIoU", "gIoU", "N-acc", "T-acc", "vqa_exact")}
    first["blind_cIoU"] = round(language_blind_baseline(mixed)["cIoU"], 1)

    def scores(task, count):
        return evaluate_conversations(model, processor, write_held_out(folder / task, name, count, start, task))

    vqa, chats = scores("vqa", dialogue["vqa_records"]), scores("chat", dialogue["chat_records"])
    several = scores("multi", dialogue["multi_records"])
    return first, {
        "vqa_by_kind": {kind: round(value, 1) for kind, value in sorted(vqa["vqa_by_kind"].items())},
        "describe_names_every_shape": round(vqa["describe_names_every_shape"], 1),
        "chat_switch": round(chats["chat_switch"], 1), "multi_all_right": round(several["multi_all_right"], 1),
        "multi_labels": round(several["multi_labels"], 1),
    }


def floor_lines(measured: dict, floors: dict, prefix: str = "") -> list[str]:
    """"figure: measured (floor F, margin M)" for every measured figure, nested dicts flattened with dots."""
    lines = []
    for key, value in measured.items():
        floor = floors.get(key) if isinstance(floors, dict) else None
        if isinstance(value, dict):
            lines += floor_lines(value, floor or {}, f"{prefix}{key}.")
        else:
            margin = f"floor {floor:g}, margin {value - floor:.1f}" if isinstance(floor, (int, float)) else "no floor"
            lines.append(f"  {prefix}{key}: {value:.1f} ({margin})")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "demo_model")
    parser.add_argument("--write", action="store_true", help="put the figures into the fixture's measured entries")
    args = parser.parse_args(argv)
    from transformers import AutoModel, AutoProcessor

    torch.manual_seed(0)
    floors = json.loads(FIXTURE.read_text())
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    measured, dialogue = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("test", "drawn"):
            measured[name], dialogue[name] = measure_set(model, processor, name, floors, Path(scratch) / name)
    example = drawn_scene_answer(args.model, floors["example_seed"], ROOT / "examples" / "shapes.png", EXAMPLE_REQUEST)
    for name in ("test", "drawn"):
        print(f"{name}, {floors['samples']} mixed records (first turns):")
        print("\n".join(floor_lines(measured[name], floors[name])))
        print(f"{name}, dialogue ({floors['dialogue']['vqa_records']} questions, {floors['dialogue']['chat_records']} "
              f"chats, {floors['dialogue']['multi_records']} several-target requests):")
        print("\n".join(floor_lines(dialogue[name], floors["dialogue"][name])))
    print("example image,", EXAMPLE_REQUEST, "->", example["text"])
    for entry in example["masks"]:
        print(f"  {entry['label']!r}: covers {entry['covered']}")
    if args.write:
        floors["measured"], floors["dialogue"]["measured"], floors["example_measured"] = measured, dialogue, example
        FIXTURE.write_text(json.dumps(floors, indent=2) + "\n")
        print(f"measured figures written to {FIXTURE}")


if __name__ == "__main__":
    main()
