"""How fast the demo's language model learns to answer questions about its scenes, per configuration (language-model
layers x peak learning rate, other text config fields optional), side by side: is the lever for the demo model's VQA
more steps, a higher learning rate, a bigger language model or other vision features? Each run is the build's
dialogue stage (stages.train_dialogue: the vision tower frozen, next-token loss on the answers) from the build's vision
stage, on every question-only record of the v3 data (build.questions_stage: the LLaVA export, the generator's
questions and the fresh conversations' questions); language-model weights that no longer fit are new. Scored along
the way by VQA exact match (evaluation.normalize_answer) of the greedy answer to the single-question records of both
held-out sets, per kind, and of the first questions it trains on ("seen": underfitting or overfitting).

    .venv/bin/python benchmarks/demo_dialogue.py --configs 4:1e-3 8:1e-3 --steps 4000 --eval-at 800 2000 4000
    .venv/bin/python benchmarks/demo_dialogue.py --configs 4:1e-3:num_key_value_heads=4,intermediate_size=768
    .venv/bin/python benchmarks/demo_dialogue.py --configs 4:1e-3 --out runs/demo-place \
        --vision-targets kind colour size column row centre

The data, questions and vision stages come from the build's cache under --out (python -m stamp_hf.synthetic.build
makes them; other build settings after the benchmark's own, such as --vision-targets, are passed to it). Figures go to
--results.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from stamp_hf.synthetic import build
from stamp_hf.synthetic.stages import base_vqa_exact, load_base, single_questions, train_dialogue

SEEN_QUESTIONS = 150


MERGER_OUT = ("model.visual.merger.mlp.2.weight", "model.visual.merger.mlp.2.bias")  # writes the text width


def language_model(model, layers: int, text_settings: dict):
    """The vision stage's base `model` with a language model of `layers` layers and `text_settings` (text config
    fields such as num_key_value_heads, intermediate_size or hidden_size): the weights of matching shape kept, the
    others new. A wider hidden_size keeps the vision features as they were, in its first dimensions (the merger's
    output layer padded with zeros), so that no vision stage is rebuilt; give num_attention_heads with it so that
    the head size stays what mrope_section splits (hidden_size 384: 8 heads)."""
    import copy

    from transformers import Qwen2VLForConditionalGeneration

    if layers == model.config.text_config.num_hidden_layers and not text_settings:
        return model
    config = copy.deepcopy(model.config)  # the new model's; the given model keeps its own
    config.text_config.num_hidden_layers = layers
    config.text_config.layer_types = ["full_attention"] * layers
    for name, value in text_settings.items():
        setattr(config.text_config, name, value)
    width = text_settings.get("hidden_size")
    if width is not None:
        if width < config.vision_config.hidden_size:
            raise SystemExit(f"hidden_size={width}: narrower than the vision features ({config.vision_config.hidden_size})")
        config.vision_config.hidden_size = width
    torch.manual_seed(0)
    changed = Qwen2VLForConditionalGeneration(config)
    own, old = changed.state_dict(), model.state_dict()
    kept = {k: v for k, v in old.items() if k in own and own[k].shape == v.shape}
    if width is not None:
        for name in MERGER_OUT:
            kept[name] = torch.zeros_like(own[name])
            kept[name][:old[name].shape[0]] = old[name]
    changed.load_state_dict(kept, strict=False)
    return changed


def parse_config(config: str) -> tuple[int, float, dict]:
    """"LAYERS:PEAK_LR[:FIELD=INT,...]" -> (layers, learning rate, text config fields)."""
    layers, learning_rate, *rest = config.split(":")
    settings = dict(item.split("=") for item in rest[0].split(",")) if rest else {}
    return int(layers), float(learning_rate), {k: int(v) for k, v in settings.items()}


def run(config: str, steps: int, eval_at: set, vision: Path, questions: Path, held_out: list, log) -> dict:
    """One configuration "LAYERS:LEARNING_RATE": train_dialogue for `steps`, scored at each of `eval_at`."""
    layers, learning_rate, text_settings = parse_config(config)
    model, processor = load_base(vision)
    model = language_model(model, layers, text_settings)
    seen = []
    for line in questions.read_text().splitlines()[:SEEN_QUESTIONS]:
        record = json.loads(line)
        question, reply = record["messages"][:2]
        seen.append((record["image"], question["content"], reply["content"], "seen/all"))
    points, start = [], time.perf_counter()

    def score(entry):
        log(dict(entry, config=config))
        if entry["step"] in eval_at:
            trained = time.perf_counter() - start - sum(p["scoring_seconds"] for p in points)
            scoring = time.perf_counter()
            held, fit = base_vqa_exact(model, processor, held_out), base_vqa_exact(model, processor, seen)
            points.append(dict(step=entry["step"], train_minutes=round(trained / 60, 1), loss=entry["loss"],
                               held_out=held, seen=fit["seen"], scoring_seconds=time.perf_counter() - scoring))
            log(dict(config=config, **{k: v for k, v in points[-1].items() if k != "held_out"},
                     **{name: held[name] for name in held if "/" not in name and name != "all"}))

    log_every = math.gcd(100, *eval_at)  # train_dialogue reports (and so scores) every log_every steps
    train_dialogue(model, processor, questions, steps, learning_rate=learning_rate, log_every=log_every, log=score)
    return dict(layers=layers, learning_rate=learning_rate, text_settings=text_settings, steps=steps, points=points)


def table(runs: dict, sets) -> str:
    """Steps down, configurations across: VQA exact on each held-out set, then on seen questions."""
    steps = sorted({p["step"] for r in runs.values() for p in r["points"]})
    lines = ["| step | " + " | ".join(f"{c} {' / '.join(sets)} / seen" for c in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for step in steps:
        cells = []
        for r in runs.values():
            point = next((p for p in r["points"] if p["step"] == step), None)
            if point is None:
                cells.append("")
                continue
            scores = [point["held_out"][name] for name in sets] + [point["seen"]]
            cells.append(" / ".join(map(str, scores)) + f" ({point['train_minutes']} min)")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["4:1e-3", "8:1e-3"],
                        help="LAYERS:PEAK_LEARNING_RATE[:TEXT_CONFIG_FIELD=INT,...] each")
    parser.add_argument("--steps", type=int, default=4000, help="steps of batch 8 per configuration")
    parser.add_argument("--eval-at", type=int, nargs="+", default=[800, 2000, 4000])
    parser.add_argument("--sets", nargs="+", default=["test", "drawn"], choices=["test", "drawn"],
                        help="the held-out sets scored")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="the build's --out (its cached stages)")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/demo_dialogue_cpu.json"))
    parser.add_argument("--threads", type=int, default=2)
    args, build_argv = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    build_args = build.argument_parser().parse_args(["--out", str(args.out), *build_argv])
    build.vision_stage(args.out, build_args.vision_steps, build_args.vision_targets)
    questions = build.questions_stage(args.out, build_args)
    held_out = single_questions(build.data_folder(args.out, "v3"), args.sets)
    runs = {}
    for config in args.configs:
        runs[config] = run(config, args.steps, set(args.eval_at), args.out / "base-vision" / "model", questions,
                           held_out, build.log_json)
    print(f"\nVQA exact % of the single-question records of {' and '.join(args.sets)} and of {SEEN_QUESTIONS} "
          f"trained-on questions; CPU: {os.cpu_count()} cores, {args.threads} threads; "
          f"Python {sys.version.split()[0]}\n")
    print(table(runs, args.sets))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(dict(questions=sum(1 for _ in questions.open()), held_out=len(held_out),
                                            runs=runs, args={k: str(v) for k, v in vars(args).items()}), indent=2))
    return runs


if __name__ == "__main__":
    main()
