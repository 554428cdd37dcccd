"""Scores of the v3 abilities on held-out records written with `version="v3"` (stamp_hf.synthetic.chats): VQA exact
match per question kind, descriptions that name every shape with its colour, segmentation turns of chats that come
after another turn (IoU >= 0.8 per turn), and multi-target answers with every mask right and every label naming its
target.

A turn is right when each of its `<|seg|>` targets is: IoU >= SWITCH_IOU with the true mask, or, for a target that is
not there, an empty predicted mask (the gRefCOCO convention, per target). Predictions are matched to targets in order
(the k-th predicted mask to the k-th `<|seg|>` of the reference); a missing mask counts as empty.

    turns = record_turns(record, folder)           # what each assistant turn expects
    scores = score_turns([dict(turn, response=..., predictions=[...]) for turn in turns])
"""

import collections
import re
from pathlib import Path

import numpy as np

from ..data import SEG_TOKEN, load_mask
from ..evaluation import normalize_answer, target_iou
from .scenes import COLOURS, SHAPES

SWITCH_IOU = 0.8  # a chat's or a multi-target answer's mask counts as right from this IoU on
NAMED_SHAPE = re.compile(rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})\b")


def names_every_shape(response: str, shapes) -> bool:
    """Whether the response names exactly the scene's shapes, each with its colour ("red circle"), as often as the
    scene holds it and no other. `shapes`: [kind, colour, ...] per shape (a v3 record's "shapes")."""
    said = collections.Counter(NAMED_SHAPE.findall(response.lower()))
    return said == collections.Counter((colour, kind) for kind, colour, *_ in shapes)


def target_names(answer: str) -> list[str]:
    """The name before each `<|seg|>` of a reference answer ("The red circle is <|seg|> and the blue square is
    <|seg|>." -> ["the red circle", "the blue square"])."""
    chunks = answer.split(SEG_TOKEN)[:-1]
    return [re.sub(r"^(,\s*|and\s+)+|\s+(is|are)$", "", chunk.strip().lower()).strip() for chunk in chunks]


def labels_name_targets(response: str, answer: str) -> bool:
    """Whether the response has one `<|seg|>` per target and the text before each one names that target."""
    labels = response.lower().split(SEG_TOKEN)[:-1]
    names = target_names(answer)
    return len(labels) == len(names) and all(name in label for name, label in zip(names, labels))


def record_turns(record: dict, folder) -> list[dict]:
    """The assistant turns of a v3 held-out record: per turn its tag, the record's task, the messages before it (the
    question last), its reference answer, its targets (one boolean mask per `<|seg|>`, None for an absent target)
    and the scene's shapes."""
    from PIL import Image

    folder = Path(folder)
    with Image.open(folder / record["image"]) as image:
        size = image.size
    targets = [None if "empty" in spec else load_mask(spec, size, folder, record["image"]) for spec in record["masks"]]
    turns, used = [], 0
    assistant = [k for k, m in enumerate(record["messages"]) if m["role"] == "assistant"]
    for tag, k in zip(record["turns"], assistant):
        answer = record["messages"][k]["content"]
        segs = answer.count(SEG_TOKEN)
        turns.append({"tag": tag, "task": record["task"], "messages": record["messages"][:k], "answer": answer,
                      "targets": targets[used:used + segs], "shapes": record["shapes"], "image": record["image"]})
        used += segs
    return turns


def turn_right(turn: dict) -> bool:
    """Every target of a segmentation turn right (IoU >= SWITCH_IOU, or empty for an absent one)."""
    predictions = list(turn["predictions"]) + [None] * len(turn["targets"])
    return all(target_iou(p, t) >= SWITCH_IOU for p, t in zip(predictions, turn["targets"]))


def percent(hits) -> float | None:
    hits = list(hits)
    return 100 * sum(hits) / len(hits) if hits else None


def score_turns(turns: list[dict]) -> dict:
    """The v3 scores (in %, None without such turns) of turns from `record_turns` with the model's `response` and
    `predictions` (its masks, in order) added:
    - vqa_exact, vqa_by_kind: exact match (evaluation.normalize_answer) of the question turns, overall and per kind;
    - describe_names_every_shape: description answers that name every shape with its colour (`names_every_shape`);
    - chat_switch: segmentation turns of chats after another turn ("segment it", "the other one", "the one left of
      it", a new target) with every target right; chat_switch_by_move per move;
    - multi_all_right: multi-target answers with every target right; multi_labels: those whose labels name their
      targets (`labels_name_targets`); multi_by_targets: all right, per number of targets;
    - and the counts of each."""
    vqa = [t for t in turns if t["tag"]["task"] == "vqa"]
    by_kind = collections.defaultdict(list)
    for turn in vqa:
        by_kind[turn["tag"]["kind"]].append(normalize_answer(turn["response"]) == normalize_answer(turn["answer"]))
    describe = [names_every_shape(t["response"], t["shapes"]) for t in vqa if t["tag"]["kind"] == "describe"]
    switches = [t for t in turns if t["task"] == "chat" and t["tag"]["task"] == "seg" and t["tag"]["move"] != "first"]
    by_move = collections.defaultdict(list)
    for turn in switches:
        by_move[turn["tag"]["move"]].append(turn_right(turn))
    multi = [t for t in turns if t["tag"].get("move") == "multi"]
    by_targets = collections.defaultdict(list)
    for turn in multi:
        by_targets[len(turn["targets"])].append(turn_right(turn))
    return {
        "vqa_samples": len(vqa),
        "vqa_exact": percent(hit for hits in by_kind.values() for hit in hits),
        "vqa_by_kind": {kind: percent(hits) for kind, hits in sorted(by_kind.items())},
        "describe_names_every_shape": percent(describe),
        "chat_switch_samples": len(switches),
        "chat_switch": percent(turn_right(t) for t in switches),
        "chat_switch_by_move": {move: percent(hits) for move, hits in sorted(by_move.items())},
        "multi_samples": len(multi),
        "multi_all_right": percent(turn_right(t) for t in multi),
        "multi_labels": percent(labels_name_targets(t["response"], t["answer"]) for t in multi),
        "multi_by_targets": {str(n): percent(hits) for n, hits in sorted(by_targets.items())},
    }


def respond(model, processor, image, messages: list[dict], max_new_tokens: int = 48) -> tuple[str, list[np.ndarray]]:
    """The model's greedy answer to the last user turn of `messages` (earlier answers as given: teacher-forced), through
    the inference path every caller uses: its text (`<|seg|>` kept) and one boolean mask per `<|seg|>` it wrote."""
    import torch

    from ..data import record_chat

    inputs, images = processor.encode_chat(record_chat(image, messages))
    with torch.no_grad():
        out = model.generate_with_masks(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    (result,) = processor.post_process_generation(out, inputs["input_ids"].shape[1], [[images[0].size[::-1]]],
                                                  model.config.mask_threshold,
                                                  stop_ids=model.generation_config.eos_token_id)
    return result["text"].strip(), [np.asarray(entry["mask"]) > 0 for entry in result["masks"]]


def evaluate_conversations(model, processor, jsonl, limit: int | None = None) -> dict:
    """`score_turns` of every assistant turn of the first `limit` records of a v3 held-out file, each turn answered by
    `respond` with the turns before it as the record gives them."""
    import json

    from ..processing_stamp import load_image

    folder = Path(jsonl).parent
    records = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()][:limit]
    turns = []
    for record in records:
        image = load_image(folder / record["image"], upright=False)  # dataset images: stored orientation
        for turn in record_turns(record, folder):
            response, predictions = respond(model, processor, image, turn["messages"])
            turns.append(dict(turn, response=response, predictions=predictions))
    return score_turns(turns)


def drawn_scene_answer(model_folder, seed: int, image, request: str) -> dict:
    """`request` about the drawn scene of `seed` (stamp_hf.synthetic.drawn, saved as `image`) through the pipeline a
    user calls: its text and, per mask, its label and the share of every shape's pixels it covers, by "colour kind"."""
    import random

    from transformers import pipeline

    from .drawn import drawn_scene

    shapes, _, object_masks = drawn_scene(random.Random(seed))
    segmenter = pipeline("stamp-segmentation", model=str(model_folder), trust_remote_code=True)
    result = segmenter(str(image), request)
    names = [f"{s.colour} {s.kind}" for s in shapes]
    masks = []
    for entry in result["masks"]:
        mask = np.asarray(entry["mask"]) > 0
        masks.append(dict(label=entry["label"], covered={name: round(float((mask & shape).sum() / shape.sum()), 2)
                                                          for name, shape in zip(names, object_masks)}))
    return dict(text=result["text"], masks=masks)


__all__ = ["SWITCH_IOU", "drawn_scene_answer", "evaluate_conversations", "respond", "labels_name_targets",
           "names_every_shape", "record_turns", "score_turns", "target_iou", "target_names", "turn_right"]
