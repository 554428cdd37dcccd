"""Does a demo model's text answer use the picture? On unseen scenes of the test split, "Is there a red circle?" with
the target present on about half (stamp_hf.synthetic.chats.existence_question, the generator's own question), three
ways side by side per model:

- the text answer (scoring.respond, the evaluation's path: right when it says yes exactly when the target is there),
  and the model's P(Yes) against P(No) at the first answer token, present and absent apart: equal means the answer
  ignores the picture;
- the mask answer to a request for the same target (right when the mask is empty exactly when it is absent), which
  STAMP's phase 2 computes from each patch's own feature;
- a logistic probe, per layer, of the hidden state the first answer token is predicted from (fit on 3/4 of the
  cases, scored on the rest): whether presence is there at all for the language-model head to read.

`--finetune STEPS:LR` (repeatable) trains the first model further on existence questions alone (three a scene, on
train-split scenes no build stage uses) through `stamp-hf train` (build.stamp_stage, vision tower frozen;
`STEPS:LR:vision` trains the ViT and its merger too) and scores each result too: whether the skill is learnable by
this model at all, how fast, and whether the vision features stand in the way.

    .venv/bin/python benchmarks/demo_existence.py demo_model --cases 400 --finetune 800:1e-3 --finetune 800:1e-3:vision

Runs go to --out, figures to --results.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stamp_hf.data import record_chat
from stamp_hf.evaluation import normalize_answer
from stamp_hf.synthetic import build
from stamp_hf.synthetic.chats import existence_question
from stamp_hf.synthetic.scenes import draw_scene, request, split_seeds
from stamp_hf.synthetic.scoring import respond

TRAINING_SEEDS = 6 * 10**6  # the first train-split seed of the existence-only records (no build stage reaches it)
TRAINING_FILE = "existence_train.jsonl"


def existence_cases(split: str, count: int, start: int = 0) -> list[dict]:
    """Scenes `start`.. of `split` (as make_sample draws them), each with an existence question and a segmentation
    request for the same target; scenes with no such target are skipped."""
    cases = []
    for seed in split_seeds(split, count, start):
        rng = random.Random(seed)
        shapes, image, _ = draw_scene(rng)
        found = existence_question(rng, shapes, image.size)
        if found is not None:
            question, answer, members, reference = found
            cases.append(dict(image=image, question=question, answer=answer, present=bool(members),
                              request=request(rng, reference)))
    return cases


def write_training_records(folder: Path, scenes: int) -> Path:
    """`scenes` train-split scenes from TRAINING_SEEDS, each with up to three existence questions, as training
    records in folder/TRAINING_FILE (images under folder/images)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for seed in split_seeds("train", scenes, TRAINING_SEEDS):
        rng = random.Random(seed)
        shapes, image, _ = draw_scene(rng)
        messages = []
        for found in filter(None, (existence_question(rng, shapes, image.size) for _ in range(3))):
            messages += [{"role": "user", "content": found[0]}, {"role": "assistant", "content": found[1]}]
        if messages:
            path = folder / "images" / f"{seed:09d}.png"
            image.save(path)
            lines.append(json.dumps({"image": str(path.resolve()), "messages": messages}) + "\n")
    (folder / TRAINING_FILE).write_text("".join(lines))
    return folder / TRAINING_FILE


def answer_position(model, processor, case: dict, yes: int, no: int) -> tuple[float, list[np.ndarray]]:
    """P(Yes) / (P(Yes) + P(No)) (token ids `yes`, `no`) at the first answer token of the case's question, and the
    hidden state it is predicted from, per layer (embeddings first)."""
    inputs, _ = processor.encode_chat(record_chat(case["image"], [{"role": "user", "content": case["question"]}]))
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    p = out.logits[0, -1].float().softmax(-1)
    return float(p[yes] / (p[yes] + p[no])), [h[0, -1].float().numpy() for h in out.hidden_states]


def probe_accuracy(features: np.ndarray, present: np.ndarray, seed: int = 0) -> float:
    """Held-out accuracy (%) of a logistic probe for presence, fit on the first 3/4 of `features` (standardised on
    them) and scored on the rest."""
    fit = len(features) * 3 // 4
    mean, std = features[:fit].mean(0), features[:fit].std(0) + 1e-6
    x = torch.tensor((features - mean) / std, dtype=torch.float32)
    y = torch.tensor(present, dtype=torch.float32)
    torch.manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.01)
    for _ in range(500):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(x[:fit])[:, 0], y[:fit])
        optimizer.zero_grad()
        (loss + 1e-3 * probe.weight.square().sum()).backward()
        optimizer.step()
    with torch.no_grad():
        return 100.0 * float(((probe(x[fit:])[:, 0] > 0) == y[fit:].bool()).float().mean())


def score(model_folder: Path, cases: list[dict]) -> dict:
    """The three views of one model on `cases` (see the module's docstring)."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_folder, trust_remote_code=True)
    start = time.perf_counter()
    present = np.array([case["present"] for case in cases])
    yes, no = (processor.tokenizer.encode(word)[0] for word in ("Yes", "No"))
    yes_share, hidden, text_right, mask_right = [], [], [], []
    for case in cases:
        share, states = answer_position(model, processor, case, yes, no)
        yes_share.append(share)
        hidden.append(states)
        text, _ = respond(model, processor, case["image"], [{"role": "user", "content": case["question"]}])
        text_right.append(normalize_answer(text) == normalize_answer(case["answer"]))
        _, masks = respond(model, processor, case["image"], [{"role": "user", "content": case["request"]}])
        mask_right.append(any(mask.any() for mask in masks) == case["present"])
    yes_share = np.array(yes_share)
    return dict(
        cases=len(cases), present=int(present.sum()),
        text_right=100.0 * np.mean(text_right), mask_right=100.0 * np.mean(mask_right),
        p_yes_present=float(yes_share[present].mean()), p_yes_absent=float(yes_share[~present].mean()),
        probe_by_layer=[probe_accuracy(np.stack([states[layer] for states in hidden]), present)
                        for layer in range(len(hidden[0]))],
        seconds=round(time.perf_counter() - start, 1))


def finetune(out: Path, model_folder: Path, arm: str, data: Path) -> tuple[Path, dict]:
    """The first model trained further on existence questions alone as `arm` ("STEPS:LR", or "STEPS:LR:vision" with
    the vision tower trained too): (its folder, the stage's record: steps, learning rate, seconds, ...)."""
    steps, learning_rate, *vision = arm.split(":")
    if vision not in ([], ["vision"]):
        raise SystemExit(f"--finetune {arm}: expected STEPS:LR or STEPS:LR:vision")
    name = "-".join(["existence", steps, learning_rate, *vision])
    result = build.stamp_stage(out, name, data, model_folder, int(steps), start_from=model_folder.resolve(),
                               learning_rate=float(learning_rate), files=(TRAINING_FILE,),
                               train_vision_tower=bool(vision))
    return out / name / "model", result


ROWS = [("text answer right %", lambda r: f"{r['text_right']:.1f}"),
        ("P(Yes), target present", lambda r: f"{r['p_yes_present']:.3f}"),
        ("P(Yes), target absent", lambda r: f"{r['p_yes_absent']:.3f}"),
        ("mask answer right (empty iff absent) %", lambda r: f"{r['mask_right']:.1f}")]


def table(models: dict) -> str:
    """The figures of every model side by side, a row per view and one per probed layer."""
    layers = max(len(r["probe_by_layer"]) for r in models.values())
    rows = ROWS + [(f"probe on the answer position, layer {layer} %", lambda r, k=layer: f"{r['probe_by_layer'][k]:.1f}")
                   for layer in range(layers)]
    lines = ["| | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    lines += [f"| {label} | " + " | ".join(cell(r) for r in models.values()) + " |" for label, cell in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a demo model folder")
    parser.add_argument("--cases", type=int, default=400, help="test-split scenes to ask about")
    parser.add_argument("--finetune", action="append", default=[], metavar="STEPS:LR[:vision]",
                        help="also train the model on existence questions alone this long, at this peak rate "
                             "(:vision: its vision tower too)")
    parser.add_argument("--training-scenes", type=int, default=6000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/demo-existence"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/demo_existence_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = existence_cases("test", args.cases)
    models, stages = {str(args.model): score(args.model, cases)}, {}
    if args.finetune:
        data = args.out / "data"
        if not (data / TRAINING_FILE).exists():
            write_training_records(data, args.training_scenes)
        for arm in args.finetune:
            folder, stages[arm] = finetune(args.out, args.model, arm, data)
            models[f"+ existence only, {arm}"] = score(folder, cases)
    print(table(models))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(dict(
        command=" ".join(sys.argv), threads=args.threads, training_scenes=args.training_scenes, models=models,
        stages={arm: {k: stage[k] for k in ("steps", "learning_rate", "train_vision_tower", "seconds")}
                for arm, stage in stages.items()}),
        indent=2))


if __name__ == "__main__":
    main()
