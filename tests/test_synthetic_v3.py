"""The generator's v3 conversations (stamp_hf.synthetic.chats): every question kind with exact answers, chats that
switch targets and refer back, multi-target requests with one labelled `<|seg|>` per target; no wording shortcut,
the same in every process, loaded by the training and evaluation paths; and the v3 scorer
(stamp_hf.synthetic.scoring) on hand-made predictions."""

import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from stamp_hf.synthetic.chats import MOVES, QUESTION_KINDS_V3, TASKS_V3, holds, shape_name
from stamp_hf.synthetic.scenes import ABSENT_SHARE, FORMS, make_sample, write_split
from stamp_hf.synthetic.scoring import (
    labels_name_targets,
    names_every_shape,
    record_turns,
    score_turns,
    target_iou,
    target_names,
)

SEEDS = range(600)


@pytest.fixture(scope="module")
def samples():
    return [make_sample(seed, version="v3") for seed in SEEDS]


def seg_turns(sample):
    """(user text, answer, tag, masks of this turn) of each segmentation turn of a sample."""
    used, out = 0, []
    assistant = [k for k, m in enumerate(sample.messages) if m["role"] == "assistant"]
    for tag, k in zip(sample.turns, assistant):
        answer = sample.messages[k]["content"]
        segs = answer.count("<|seg|>")
        if tag["task"] == "seg":
            out.append((sample.messages[k - 1]["content"], answer, tag, sample.masks[used:used + segs]))
        used += segs
    return out


def test_v3_samples_are_the_same_in_every_process_and_v2_stays_the_default():
    code = ("import json; from stamp_hf.synthetic.scenes import make_sample; "
            "print(json.dumps([[make_sample(s, version='v3').messages, make_sample(s, version='v3').turns] "
            "for s in range(120)]))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)]
    assert runs[0] == runs[1] and len(json.loads(runs[0])) == 120
    for seed in range(20):
        v2, v3 = make_sample(seed), make_sample(seed, version="v3")
        assert v2.turns is None and v2.messages == make_sample(seed, version="v2").messages
        assert v3.image.tobytes() == v2.image.tobytes()  # the same scene, a v3 conversation about it
    with pytest.raises(ValueError, match="unknown data version 'v9'"):
        make_sample(0, version="v9")


def test_every_task_question_kind_and_move_occurs(samples):
    tasks = collections.Counter(s.task for s in samples)
    kinds = {t["kind"] for s in samples for t in s.turns if t["task"] == "vqa"}
    moves = {t["move"] for s in samples for t in s.turns if t["task"] == "seg"}
    assert set(tasks) == set(TASKS_V3) and set(kinds) == set(QUESTION_KINDS_V3) and moves == set(MOVES)
    chats = [s for s in samples if s.task == "chat"]
    assert {len(s.turns) for s in chats} == {2, 3, 4}
    for sample in samples:
        assistant = [m for m in sample.messages if m["role"] == "assistant"]
        assert len(assistant) == len(sample.turns)
        assert len(sample.masks) == sum(m["content"].count("<|seg|>") for m in assistant)
        assert [m["role"] for m in sample.messages] == ["user", "assistant"] * len(assistant)


def test_questions_never_name_what_they_ask_and_answers_are_true(samples):
    checked = collections.Counter()
    for sample in samples:
        shapes, frame = sample.shapes, sample.image.size
        for k, tag in enumerate(sample.turns):
            if tag["task"] != "vqa":
                continue
            text, answer = sample.messages[2 * k]["content"].lower(), sample.messages[2 * k + 1]["content"]
            checked[tag["kind"]] += 1
            word = answer.rstrip(".").split()[-1]
            if tag["kind"] in ("colour", "kind", "size"):  # the subject, without the offered alternatives
                subject = re.sub(r"(big|large|small) or (small|big|large)", "", text)
                assert word not in subject and not (word == "big" and "large" in subject), (text, answer)
            if tag["kind"] == "position":
                assert not re.search(r"\b(leftmost|rightmost|topmost|bottommost)\b", text), text
            if tag["kind"] == "describe":
                assert names_every_shape(answer, [[s.kind, s.colour] for s in shapes]), answer
            if tag["kind"] == "count":
                noun = re.search(r"(how many|count the) (.+?)( are| can|\.|$)", text).group(2).split()
                true = sum((noun[-1] in ("shapes", s.kind + "s")) and all(w in (s.colour, s.kind + "s", "shapes")
                                                                           for w in noun) for s in shapes)
                assert answer.split()[2 if true else 2] == ("no", "one", "two", "three", "four", "five")[true], (text, answer)
            if tag["kind"] == "relation" and answer in ("Yes, it is.", "No, it is not."):
                x, relation, y = re.fullmatch(r"is (the .+?) (to the left of|left of|to the right of|right of|above|below|under) (the .+)\?", text.rstrip(".")).groups() if text.endswith("?") else (None,) * 3
                if x is not None:
                    a = next(i for i in range(len(shapes)) if shape_name(shapes, i, frame) == x)
                    b = next(i for i in range(len(shapes)) if shape_name(shapes, i, frame) == y)
                    key = {"to the left of": "left of", "to the right of": "right of", "under": "below"}.get(relation, relation)
                    assert holds(shapes, frame, a, b, key) == (answer == "Yes, it is."), (text, answer)
    assert set(checked) == set(QUESTION_KINDS_V3) and min(checked.values()) >= 20, checked
    yes_no = collections.Counter(s.messages[2 * k + 1]["content"] for s in samples for k, t in enumerate(s.turns)
                                 if t["task"] == "vqa" and t["kind"] == "exists")
    assert abs(yes_no["Yes, there is."] - yes_no["No, there is not."]) <= 0.3 * sum(yes_no.values()), yes_no


def test_existence_questions_come_with_the_target_they_ask_about():
    """existence_question (the generator's "Is there ...?", which benchmarks/demo_existence.py also asks as a
    segmentation request): its members are its reference's on the scene, yes exactly when there are some, the noun
    asked is the reference's, and both answers come."""
    import random

    from stamp_hf.synthetic.chats import existence_question
    from stamp_hf.synthetic.scenes import draw_scene

    answers = collections.Counter()
    for seed in range(200):
        rng = random.Random(seed)
        shapes, image, _ = draw_scene(rng)
        found = existence_question(rng, shapes, image.size)
        if found is None:
            continue
        question, answer, members, reference = found
        assert reference.members(shapes, image.size) == members
        assert answer == ("Yes, there is." if members else "No, there is not.")
        assert reference.noun(random.Random(0)).split()[-1] in question, question
        answers[answer] += 1
    assert min(answers.values()) >= 60, answers


def test_absent_targets_are_asked_and_answered_like_present_ones(samples):
    """Per `<|seg|>`: the answer names the request's phrase the same way whether the target is there or not; every
    form is asked both ways; the share of absent targets is ABSENT_SHARE's, in single and in multi-target requests."""
    forms = collections.defaultdict(set)
    absent = collections.defaultdict(list)
    for sample in samples:
        for text, answer, tag, masks in seg_turns(sample):
            assert tag["present"] == [m is not None for m in masks]
            if tag["move"] in ("first", "switch", "multi"):
                for name, present in zip(target_names(answer), tag["present"]):
                    typed = re.sub(r"^the ", "", name)
                    assert typed in text.lower(), (text, answer)  # the label echoes the request
                absent[tag["move"] == "multi"] += [not p for p in tag["present"]]
            if sample.task in ("refer", "none"):
                forms[sample.task].add(sample.form)
    assert forms["refer"] == forms["none"] == set(FORMS)
    for multi, flags in absent.items():
        assert abs(np.mean(flags) - ABSENT_SHARE) < 0.08, (multi, np.mean(flags))


def test_labels_name_what_each_mask_holds(samples):
    """Multi-target and chat answers: each `<|seg|>`'s mask is exactly the shapes its label names (attribute names:
    every shape of the mask has the named colour and kind; refer-backs: the one shape the name picks out); after an
    absent target a chat's next request is for a present one."""
    checked = collections.Counter()
    for sample in samples:
        shapes, frame, objects = sample.shapes, sample.image.size, sample.object_masks
        last_absent = False
        for text, answer, tag, masks in seg_turns(sample):
            if sample.task == "chat" and tag["move"] != "first" and last_absent:
                assert tag["present"] == [True], sample.messages
            last_absent = not tag["present"][-1]
            for name, mask in zip(target_names(answer), masks):
                if mask is None:
                    continue
                inside = [i for i, m in enumerate(objects) if (mask & m).any()]
                assert np.array_equal(mask, np.any([objects[i] for i in inside], axis=0))
                if tag["move"] in ("it", "other"):
                    assert [shape_name(shapes, i, frame) for i in inside] == [name], (name, sample.messages)
                    checked[tag["move"]] += 1
                elif not re.search(r" of | above | below | under ", name):
                    words = set(name.split())
                    for i in inside:
                        assert words & {"red", "green", "blue", "yellow", "purple", "orange"} <= {shapes[i].colour}, name
                        assert words & {"circle", "square", "triangle", "star", "diamond", "circles", "squares",
                                        "triangles", "stars", "diamonds"} <= {shapes[i].kind, shapes[i].kind + "s"}, name
                    checked[tag["move"]] += 1
    assert checked["multi"] >= 50 and checked["it"] >= 10 and checked["other"] >= 5, checked


def test_v3_held_out_sets_load_for_training_and_evaluation(tmp_path):
    from stamp_hf.data import STAMPDataset
    from stamp_hf.evaluation import load_jsonl_samples
    from stamp_hf.prepare import prepare_data
    from stamp_hf.synthetic.drawn import write_drawn_set
    from stamp_hf.synthetic.scenes import write_dialogue_export
    from stamp_hf.testing import tiny_processor

    processor = tiny_processor()
    for path in (write_split(tmp_path, "test", 16, version="v3"), write_drawn_set(tmp_path, 10, version="v3")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        dataset = STAMPDataset(path, processor)
        assert len(dataset) == len(records)
        for record, item in zip(records, dataset):
            segs = sum(m["content"].count("<|seg|>") for m in record["messages"] if m["role"] == "assistant")
            assert len(item["mask_labels"]) == segs == len(record["masks"])
            assert len(record["turns"]) == sum(m["role"] == "assistant" for m in record["messages"])
            for spec, label in zip(record["masks"], item["mask_labels"]):
                assert ("empty" in spec) <= (not label.any())  # an absent target trains an empty mask
        samples = load_jsonl_samples(path)  # stamp-hf eval's loader: one sample per assistant turn
        assert len(samples) == sum(len(r["turns"]) for r in records)
        assert [s.task for s in samples] == [t["task"] for r in records for t in r["turns"]]
        # each question's answer carries its kind, so stamp-hf eval breaks VQA down by it; other turns carry none
        assert [s.kind for s in samples] == [t.get("kind") for r in records for t in r["turns"]]
        assert any(s.kind for s in samples)
    assert {r["task"] for r in map(json.loads, (tmp_path / "test.jsonl").read_text().splitlines())} >= {"chat", "multi"}
    export = write_dialogue_export(tmp_path / "dialogue.json", 6, version="v3")
    assert prepare_data(export, tmp_path / "dialogue.jsonl", images=tmp_path / "dialogue_images")["records"] == 6


# ---------------------------------------------------------------------------------------------- the scorer


def square(top, left, side=10, size=(40, 40)):
    mask = np.zeros(size, dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_target_iou_and_labels_by_hand():
    a = square(0, 0)
    assert target_iou(a, a) == 1.0 and target_iou(square(0, 5), a) == pytest.approx(50 / 150)
    assert target_iou(None, None) == 1.0 and target_iou(np.zeros((40, 40), bool), None) == 1.0
    assert target_iou(a, None) == 0.0 and target_iou(None, a) == 0.0  # a mask where nothing is; none where something is
    answer = "The red circle is <|seg|>, all the stars are <|seg|> and the shape left of the blue square is <|seg|>."
    assert target_names(answer) == ["the red circle", "all the stars", "the shape left of the blue square"]
    assert labels_name_targets(answer, answer)
    assert not labels_name_targets("Sure, it is <|seg|> and <|seg|> and <|seg|>.", answer)  # unlabelled
    assert not labels_name_targets("The red circle is <|seg|> and all the stars are <|seg|>.", answer)  # one missing
    shapes = [["circle", "red", "big"], ["star", "blue", "small"], ["circle", "red", "small"]]
    assert names_every_shape("There are three shapes: a big red circle, a small blue star and a small red circle.", shapes)
    assert not names_every_shape("There are two shapes: a big red circle and a small blue star.", shapes)
    assert not names_every_shape("a red circle, a blue star, a red circle and a green square", shapes)  # one too many
    assert not names_every_shape("a red circle, a red star and a red circle", shapes)  # wrong colour


def test_score_turns_by_hand():
    a, b = square(0, 0), square(20, 20)
    shapes = [["circle", "red", "big"], ["square", "blue", "small"]]
    turns = [
        # VQA: one right, one wrong colour; a description naming both shapes
        dict(tag={"task": "vqa", "kind": "colour"}, task="vqa", answer="It is red.", response="it is red", targets=[]),
        dict(tag={"task": "vqa", "kind": "colour"}, task="chat", answer="It is red.", response="It is blue.", targets=[]),
        dict(tag={"task": "vqa", "kind": "describe"}, task="vqa", answer="x", targets=[],
             response="There are two shapes: a big red circle and a small blue square."),
        # chat switches: right (IoU 1), wrong (IoU 0.5 < 0.8), an absent target left empty (right)
        dict(tag={"task": "seg", "move": "switch"}, task="chat", answer="", response="", targets=[a], predictions=[a]),
        dict(tag={"task": "seg", "move": "it"}, task="chat", answer="", response="", targets=[a],
             predictions=[a | square(0, 10)]),
        dict(tag={"task": "seg", "move": "relative"}, task="chat", answer="", response="", targets=[None], predictions=[]),
        # a chat's first turn is no switch
        dict(tag={"task": "seg", "move": "first"}, task="chat", answer="", response="", targets=[a], predictions=[]),
        # multi: both right; second mask missing; absent target given a mask
        dict(tag={"task": "seg", "move": "multi"}, task="multi", answer="The red circle is <|seg|> and the blue "
             "square is <|seg|>.", response="The red circle is <|seg|> and the blue square is <|seg|>.",
             targets=[a, b], predictions=[a, b]),
        dict(tag={"task": "seg", "move": "multi"}, task="multi", answer="The red circle is <|seg|> and the blue "
             "square is <|seg|>.", response="The red circle is <|seg|>.", targets=[a, b], predictions=[a]),
        dict(tag={"task": "seg", "move": "multi"}, task="multi", answer="A is <|seg|>, B is <|seg|> and C is <|seg|>.",
             response="A is <|seg|>, B is <|seg|> and C is <|seg|>.", targets=[a, None, b], predictions=[a, b, b]),
    ]
    for turn in turns:
        turn["shapes"] = shapes
    scores = score_turns(turns)
    assert scores["vqa_samples"] == 3 and scores["vqa_by_kind"] == {"colour": 50.0, "describe": 0.0}
    assert scores["vqa_exact"] == pytest.approx(100 / 3) and scores["describe_names_every_shape"] == 100.0
    assert scores["chat_switch_samples"] == 3 and scores["chat_switch"] == pytest.approx(200 / 3)
    assert scores["chat_switch_by_move"] == {"it": 0.0, "relative": 100.0, "switch": 100.0}
    assert scores["multi_samples"] == 3 and scores["multi_all_right"] == pytest.approx(100 / 3)
    assert scores["multi_labels"] == pytest.approx(200 / 3) and scores["multi_by_targets"] == {"2": 50.0, "3": 0.0}


def test_evaluate_conversations_answers_each_turn_with_its_own_history(tmp_path, monkeypatch):
    """A tiny model forced to answer "it is" + one empty mask: every absent target is right, every present one
    wrong, every question wrong; turns are asked with the record's earlier turns (teacher-forced)."""
    from stamp_hf.processing_stamp import STAMPProcessor
    from stamp_hf.synthetic.scoring import evaluate_conversations
    from stamp_hf.testing import answer_with_masks, tiny_stamp

    path = write_split(tmp_path, "test", 14, version="v3", tasks=("chat", "multi"))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    model, processor = tiny_stamp(seed=1)
    answer_with_masks(model, processor, segs=1)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(-10.0)  # every mask empty
    chats = []
    real = STAMPProcessor.encode_chat
    monkeypatch.setattr(STAMPProcessor, "encode_chat",
                        lambda self, messages, *a, **k: chats.append(len(messages)) or real(self, messages, *a, **k))
    scores = evaluate_conversations(model, processor, path)
    turns = [t for r in records for t in record_turns(r, tmp_path)]
    assert chats == [len(t["messages"]) for t in turns]  # each turn with the turns before it
    switches = [t for t in turns if t["task"] == "chat" and t["tag"]["task"] == "seg" and t["tag"]["move"] != "first"]
    assert scores["chat_switch_samples"] == len(switches) > 0
    expected = 100 * sum(not any(t["tag"]["present"]) for t in switches) / len(switches)
    assert scores["chat_switch"] == pytest.approx(expected)
    multi = [t for t in turns if t["tag"].get("move") == "multi"]
    assert scores["multi_samples"] == len(multi) > 0  # one empty mask for 2-3 targets: right only where none is there
    assert scores["multi_all_right"] == pytest.approx(100 * sum(not any(t["tag"]["present"]) for t in multi) / len(multi))
    assert scores["vqa_exact"] in (None, 0.0)
