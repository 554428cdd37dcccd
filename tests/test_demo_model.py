"""The demo model shipped in demo_model/: complete, small, safe to load, loadable without stamp_hf, and still as good as
measured when it was built, on unseen samples of both held-out sets (the generator's test split and the separately
drawn set); and the kit that builds it (stamp_hf.synthetic: stages, drawn)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_isolated

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo_model"
# Floors a few points under what the shipped model measured on these very samples (120 mixed records of each v3 set,
# plus 120 questions, 40 chats and 40 several-target requests; seeds no training or benchmark run uses), so that a
# regression shows and a rerun on another machine does not trip them.
FLOORS = json.loads((ROOT / "tests" / "fixtures" / "demo_floors.json").read_text())


def test_demo_model_is_a_complete_small_safetensors_repo():
    files = {p.name for p in DEMO.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "processor_config.json", "tokenizer.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) <= 25 * 2**20
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "stamp" and config["auto_map"]["AutoModel"] == "modeling_stamp.STAMPModel"
    card = (DEMO / "README.md").read_text()
    assert "Not the paper's STAMP-2B or STAMP-7B" in card and "stamp-hf init" in card and "drawn set" in card


def test_demo_remote_code_is_the_repository_code():
    """The demo folder's remote code links to the single source, so it can never go stale, and it holds every file a
    save writes (pipeline and SAM refinement included)."""
    shipped = sorted(p.name for p in DEMO.glob("*.py"))
    assert shipped == sorted(p.name for p in ROOT.glob("*_stamp.py"))
    for name in shipped:
        assert (DEMO / name).is_symlink() and (DEMO / name).resolve() == (ROOT / name).resolve(), name


def test_demo_model_loads_without_stamp_hf(tmp_path):
    out = run_isolated(
        f"""
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(DEMO)!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({str(DEMO)!r}, trust_remote_code=True)
        print(type(model).__name__, type(processor).__name__, model.config.placeholder_attention)
        """,
        tmp_path,
    )
    assert out.split() == ["STAMPModel", "STAMPProcessor", "bidirectional"]


def held_out(tmp_path, name, count=None, task=None):
    """`count` unseen records (FLOORS["start"] on, seeds no training or benchmark run uses) of the v3 test split or
    drawn set; `task`: every record of that task (a key of stamp_hf.synthetic.chats.TASKS_V3)."""
    from stamp_hf.synthetic.drawn import write_held_out

    return write_held_out(tmp_path / (task or "mixed"), name, count or FLOORS["samples"], FLOORS["start"], task)


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModel, AutoProcessor

    return (AutoModel.from_pretrained(DEMO, trust_remote_code=True).eval(),
            AutoProcessor.from_pretrained(DEMO, trust_remote_code=True))


@pytest.mark.parametrize("name", ["test", "drawn"])
def test_demo_model_segments_and_answers_on_unseen_samples(tmp_path, demo, name):
    from stamp_hf.synthetic.stages import evaluate_demo, language_blind_baseline

    data = held_out(tmp_path, name)
    metrics = evaluate_demo(*demo, data, tmp_path / "eval")
    floors = FLOORS[name]
    assert metrics["segmentation_samples"] >= 25 and metrics["vqa_samples"] >= 20, metrics
    for key in ("cIoU", "N-acc", "T-acc", "vqa_exact"):
        assert metrics[key] >= floors[key], (key, metrics)
    assert metrics["cIoU"] > language_blind_baseline(data)["cIoU"] + floors["over_blind"], metrics  # follows the words
    assert metrics["seg_rate"] == 100.0, metrics  # every segmentation request answered with a <|seg|>
    assert metrics["no_seg_rate"] == 100.0, metrics  # no VQA answer with one


@pytest.mark.parametrize("name", ["test", "drawn"])
def test_demo_model_answers_every_kind_of_question_on_unseen_samples(tmp_path, demo, name):
    """Questions only (FLOORS["dialogue"]["vqa_records"] of them, about as many of each kind): exact answers per
    kind, and descriptions that name every shape with its colour."""
    from stamp_hf.synthetic.chats import QUESTION_KINDS_V3
    from stamp_hf.synthetic.scoring import evaluate_conversations

    floors = FLOORS["dialogue"]
    scores = evaluate_conversations(*demo, held_out(tmp_path, name, floors["vqa_records"], task="vqa"))
    assert set(scores["vqa_by_kind"]) == set(QUESTION_KINDS_V3), scores  # every kind asked
    for kind, floor in floors[name]["vqa_by_kind"].items():  # a kind one sample under 0 has none (README)
        assert scores["vqa_by_kind"][kind] >= floor, (kind, scores)
    if "describe_names_every_shape" in floors[name]:
        assert scores["describe_names_every_shape"] >= floors[name]["describe_names_every_shape"], scores


@pytest.mark.parametrize("name", ["test", "drawn"])
def test_demo_model_switches_targets_in_chats_and_segments_several_targets_on_unseen_samples(tmp_path, demo, name):
    """Chats of 2-4 turns: every later segmentation turn (after a question, after another target, "segment it",
    "and the other one", "the one left of it") right at IoU >= 0.8; requests naming two or three targets: every
    mask right, and the text before each `<|seg|>` naming its target."""
    from stamp_hf.synthetic.scoring import evaluate_conversations

    floors = FLOORS["dialogue"]
    chats = evaluate_conversations(*demo, held_out(tmp_path, name, floors["chat_records"], task="chat"))
    several = evaluate_conversations(*demo, held_out(tmp_path, name, floors["multi_records"], task="multi"))
    assert chats["chat_switch_samples"] >= 30 and several["multi_samples"] >= 20, (chats, several)
    assert chats["chat_switch"] >= floors[name]["chat_switch"], chats
    assert several["multi_labels"] >= floors[name]["multi_labels"], several
    # every mask right on a several-target request: measured 0 / 11.4 %; a floor only on the drawn set (one sample's
    # worth under 0 on the test split; README)
    if "multi_all_right" in floors[name]:
        assert several["multi_all_right"] >= floors[name]["multi_all_right"], several


def test_demo_model_writes_at_inference_what_its_training_forward_predicts(tmp_path, demo):
    """On unseen chats (questions, target switches, several targets): the prompt a turn is answered from is the
    training encoding of that chat up to the answer, and every greedy token of the answer, `<|seg|>` and the text
    after it included, is the argmax of one plain (training) forward over prompt + answer: the cached decoding, its
    rope positions and the chat template agree with training, so a wrong answer is one the model learnt, not a
    mismatch between the two paths. (On the model shipped at bb0c065, greedy exact and teacher-forced all-right agree
    on each of 151 question turns, 87 of trained-on records and 64 held-out: it answers 56 % and 59 % of them.)"""
    from stamp_hf.data import encode_record, record_chat
    from stamp_hf.processing_stamp import load_image
    from stamp_hf.synthetic.scoring import record_turns

    model, processor = demo
    data = held_out(tmp_path, "test", 8, task="chat")
    seg = processor.tokenizer.convert_tokens_to_ids("<|seg|>")
    turns = segs = 0
    for record in map(json.loads, data.read_text().splitlines()):
        image = load_image(data.parent / record["image"], upright=False)
        for turn in record_turns(record, data.parent):
            inputs, _ = processor.encode_chat(record_chat(image, turn["messages"]))
            prompt = inputs["input_ids"].shape[1]
            trained = encode_record(processor, image, [*turn["messages"], {"role": "assistant", "content": turn["answer"]}])
            assert torch.equal(trained["input_ids"][:prompt], inputs["input_ids"][0]), turn["messages"]
            with torch.no_grad():
                sequence = model.generate_with_masks(**inputs, max_new_tokens=48, do_sample=False).sequences
                extra = sequence.shape[1] - prompt
                logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence),
                               mm_token_type_ids=torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, extra)),
                               pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits
            assert torch.equal(logits[0, prompt - 1:-1].argmax(-1), sequence[0, prompt:]), turn["answer"]
            turns, segs = turns + 1, segs + int((sequence[0, prompt:] == seg).sum())
    assert turns >= 15 and segs >= 5, (turns, segs)  # questions and segmentation turns both checked


def test_demo_model_answers_a_two_target_request_with_two_labelled_masks():
    """On the README's example image, through the pipeline a user calls: one `<|seg|>` per named target, each mask
    labelled by the text that names it, covering its own shape, not the other named one, and not the blue triangle.
    (The red circle's mask also takes the red diamond, which is not named: 0.56 of it measured; README.)"""
    from stamp_hf.synthetic.scoring import drawn_scene_answer

    result = drawn_scene_answer(DEMO, FLOORS["example_seed"], ROOT / "examples" / "shapes.png",
                                "Please segment the red circle and the yellow star.")
    assert result["text"].count("<|seg|>") == 2 and len(result["masks"]) == 2, result["text"]
    targets = ("red circle", "yellow star")
    for entry, target, other in zip(result["masks"], targets, reversed(targets)):
        assert target in entry["label"].lower(), (entry["label"], target)
        covered = entry["covered"]
        assert covered[target] >= 0.6, (target, covered)  # measured 0.73 and 0.80
        assert covered[other] <= 0.25, (target, covered)  # measured 0.0 and 0.0
        assert covered["blue triangle"] <= 0.1, (target, covered)  # measured 0.0


def test_example_image_is_a_drawn_scene_with_one_red_circle():
    from PIL import Image

    from stamp_hf.synthetic.drawn import drawn_scene

    import random

    shapes, image, _ = drawn_scene(random.Random(FLOORS["example_seed"]))
    with Image.open(ROOT / "examples" / "shapes.png") as shipped:
        assert shipped.tobytes() == image.tobytes()
    assert [(s.colour, s.kind) for s in shapes].count(("red", "circle")) == 1


def test_demo_tokenizer_is_rebuilt_the_same_in_every_process_and_shipped_with_the_stamp_tokens_last():
    """The demo tokenizer is learned offline from the generator's sentences: the same vocabulary whatever Python's
    hash seed, of the shipped size, and the shipped one ends with the four STAMP tokens that `stamp-hf init` adds.
    (The shipped vocabulary was learned before the generator's order was fixed, so its ids of some merges differ
    from a rebuild's; the README says so.)"""
    import subprocess

    from transformers import AutoTokenizer

    code = ("import json; from stamp_hf.synthetic.stages import demo_tokenizer; "
            "print(json.dumps(sorted(demo_tokenizer().get_vocab().items())))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)]
    assert runs[0] == runs[1]
    rebuilt = dict(json.loads(runs[0]))
    shipped = AutoTokenizer.from_pretrained(DEMO)
    stamp_tokens = ["<|seg|>", "<|mask|>", "<|yes|>", "<|no|>"]  # after the base vocabulary, in this order
    assert shipped.convert_tokens_to_ids(stamp_tokens) == [len(rebuilt) + k for k in range(4)] == \
        [len(shipped) - 4 + k for k in range(4)]
    base = set(shipped.get_vocab()) - set(stamp_tokens)
    assert len(base ^ set(rebuilt)) <= 10  # measured: 1 merge of 711 differs each way ("ĠIMA")



def test_drawn_set_masks_are_the_drawn_pixels_and_requests_are_truthful(tmp_path):
    """The drawn set's truth: each target mask is the union of the drawn shapes the request picks out (by the
    generator's reference rules), absent targets are empty, and every pixel of a shape has a named colour."""
    from PIL import Image

    from stamp_hf.synthetic.drawn import write_drawn_set

    jsonl = write_drawn_set(tmp_path, 30)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert {r["task"] for r in records} == {"refer", "none", "vqa"}
    for record in records:
        image = np.array(Image.open(tmp_path / record["image"]))
        every = np.array(Image.open(tmp_path / record["all_shapes"])) > 0
        background = image[~every]
        assert (background == background[0]).all()  # one flat background colour
        if record["task"] == "refer":
            target = np.array(Image.open(tmp_path / record["masks"][0]["png"])) > 0
            assert target.any() and not (target & ~every).any()
        elif record["task"] == "none":
            assert record["masks"] == [{"empty": True}]
        assert record["messages"][0]["content"][0].isupper()


def test_patch_attributes_label_each_patch_with_the_shape_covering_most_of_it():
    """Kind, colour, size and where the shape's centre is (8 bins of the width and height) on a shape's patches; on
    background the patch's own place; one centre patch per shape."""
    from stamp_hf.synthetic.stages import PATCH_ATTRIBUTES, POSITION_BINS, patch_attributes
    from stamp_hf.synthetic.scenes import make_sample

    sample = make_sample(3, size=(128, 96))
    labels = patch_attributes(sample.shapes, sample.object_masks, (12, 16))
    covered = np.zeros((12, 16), bool)
    for shape, mask in zip(sample.shapes, sample.object_masks):
        cells = mask.reshape(12, 8, 16, 8).mean(axis=(1, 3)) >= 0.5  # 8 px cells of the 128 x 96 px scene
        covered |= cells
        for name, value in (("kind", shape.kind), ("colour", shape.colour), ("size", shape.size),
                            ("column", shape.cx * POSITION_BINS // 128), ("row", shape.cy * POSITION_BINS // 96)):
            assert (labels[name].numpy()[cells] == PATCH_ATTRIBUTES[name].index(value)).all()
        assert labels["centre"][shape.cy // 8, shape.cx // 8] == 1
    assert covered.any() and labels["centre"].sum() == len(sample.shapes)
    assert (labels["kind"].numpy()[~covered] == 0).all() and PATCH_ATTRIBUTES["kind"][0] == "background"
    assert (labels["colour"].numpy()[~covered] == -100).all() and (labels["size"].numpy()[~covered] == -100).all()
    rows, cols = np.nonzero(~covered)
    assert (labels["column"].numpy()[rows, cols] == (2 * cols + 1) * POSITION_BINS // 32).all()  # the patch's centre
    assert (labels["row"].numpy()[rows, cols] == (2 * rows + 1) * POSITION_BINS // 24).all()


def test_base_is_a_plain_qwen2_vl_that_stamp_hf_init_makes_into_stamp(tmp_path):
    """The demo's base: transformers' own Qwen2VLForConditionalGeneration, vision-pretrained (only the vision tower
    and its merger change), saved as a Hub repo that load_base reads back whole and `stamp-hf init` turns into a
    STAMP model with its grid bounds."""
    from PIL import Image
    from transformers import AutoModel, Qwen2VLForConditionalGeneration

    from stamp_hf.processing_stamp import user_turn
    from stamp_hf.synthetic.stages import build_base, load_base, pretrain_vision_tower, save_base
    from stamp_hf.cli import main as cli

    model, processor = build_base(seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    history = pretrain_vision_tower(model, processor.image_processor, steps=30, batch_size=4, learning_rate=3e-3,
                                    log_every=15)
    assert [entry["step"] for entry in history] == [15, 30]
    assert history[0]["colour"] < history[-1]["colour"], history
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert changed and all(name.startswith("model.visual.") for name in changed)
    save_base(model, processor, tmp_path / "base")
    loaded, loaded_processor = load_base(tmp_path / "base")
    assert type(loaded) is Qwen2VLForConditionalGeneration
    saved, read = model.state_dict(), loaded.state_dict()
    assert read.keys() == saved.keys()
    assert all(torch.equal(read[name], saved[name]) for name in saved)
    assert loaded_processor.image_processor.size == processor.image_processor.size
    assert loaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    # the chat the base is trained and asked with comes out the same: image sizes, tokens and template read back
    chat = [user_turn([Image.new("RGB", (300, 200), "white")], "What colour is the circle?")]
    (wrote, _), (reads, _) = processor.encode_chat(chat), loaded_processor.encode_chat(chat)
    assert wrote.keys() == reads.keys() and all(torch.equal(wrote[k], reads[k]) for k in wrote)
    assert cli(["init", str(tmp_path / "base"), str(tmp_path / "stamp"), "--min-placeholders", "144",
                "--max-placeholders", "256"]) == 0
    stamp = AutoModel.from_pretrained(tmp_path / "stamp", trust_remote_code=True)
    assert (stamp.config.min_placeholders, stamp.config.max_placeholders) == (144, 256)
    assert torch.equal(stamp.model.visual.state_dict()["merger.mlp.2.weight"], model.model.visual.merger.mlp[2].weight)


def test_balance_features_evens_out_the_feature_spread_at_the_embeddings_length():
    """balance_features changes only the merger's last layer; afterwards the patch features are as long as the token
    embeddings on average and their main directions are closer in spread (what lets the language model learn
    colours as fast as kinds)."""
    import random

    from stamp_hf.synthetic.stages import balance_features, build_base
    from stamp_hf.synthetic.scenes import draw_scene

    model, processor = build_base(seed=0)
    images = [draw_scene(random.Random(seed))[1] for seed in range(8)]
    inputs = processor.image_processor(images=images, return_tensors="pt")

    def features():
        with torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        return torch.cat(out.pooler_output).double()

    def spread(x):  # largest over 10th-largest eigenvalue of the covariance
        values = torch.linalg.eigvalsh(torch.cov((x - x.mean(0)).T)).flip(0)
        return (values[0] / values[9]).item()

    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = features()
    balance_features(model, processor.image_processor, scenes=32)
    after = features()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before_state[k])}
    assert changed == {"model.visual.merger.mlp.2.weight", "model.visual.merger.mlp.2.bias"}
    length = model.get_input_embeddings().weight.norm(dim=-1).mean().item()
    assert abs((after - after.mean(0)).norm(dim=-1).mean().item() / length - 1) < 0.2  # measured 1.03
    assert spread(after) < 0.6 * spread(before), (spread(before), spread(after))  # measured 60.6 -> 11.0


def test_dialogue_training_lowers_the_answer_loss_on_prepared_llava_data(tmp_path):
    """The base's instruction tuning reads what `stamp-hf prepare-data` writes from the LLaVA export and learns from
    the answers only (the vision tower stays as it was)."""
    from stamp_hf.synthetic.stages import build_base, train_dialogue
    from stamp_hf.prepare import prepare_data
    from stamp_hf.synthetic.scenes import write_dialogue_export

    export = write_dialogue_export(tmp_path / "dialogue.json", 8)
    prepared = prepare_data(export, tmp_path / "dialogue.jsonl", images=tmp_path / "dialogue_images")
    assert prepared["records"] == 8
    model, processor = build_base(seed=0)
    vision = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    history = train_dialogue(model, processor, tmp_path / "dialogue.jsonl", steps=20, batch_size=4, log_every=10)
    assert history[-1]["loss"] < history[0]["loss"] - 0.5, history
    assert all(torch.equal(vision[k], v) for k, v in model.model.visual.state_dict().items())


def test_base_vqa_exact_scores_single_questions_per_set_and_kind(tmp_path):
    """The build's base-answers score (also benchmarks/demo_dialogue.py's): single_questions keeps exactly the
    held-out records that ask one question; a base taught one answer by heart gives it exactly (100 %), the same
    question with another record's answer as the truth scores 0, counted per set/kind, per set and overall."""
    from stamp_hf.synthetic.scenes import write_split
    from stamp_hf.synthetic.stages import base_vqa_exact, build_base, single_questions, train_dialogue

    write_split(tmp_path, "test", 20, version="v3")
    records = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    asked = [r for r in records if r["task"] == "vqa" and len(r["messages"]) == 2]
    assert asked and len(asked) < len(records)  # the others are chats, requests or several questions
    items = single_questions(tmp_path, sets=("test",))
    assert [(i[1], i[2], i[3]) for i in items] == [
        (r["messages"][0]["content"], r["messages"][1]["content"], f"test/{r['messages'][1]['kind']}") for r in asked]
    (tmp_path / "learn.jsonl").write_text(json.dumps(dict(asked[0], image=str(tmp_path / asked[0]["image"]))) + "\n")
    model, processor = build_base(seed=0)
    history = train_dialogue(model, processor, tmp_path / "learn.jsonl", steps=30, batch_size=1, learning_rate=3e-3,
                             log_every=10)
    assert history[-1]["answer_token_accuracy"] == 1.0 and model.training, history
    known = items[0]
    other = next(reply for _, _, reply, _ in items if reply != known[2])
    assert base_vqa_exact(model, processor, [known]) == {"all": 100.0, "test": 100.0, known[3]: 100.0}
    assert model.training  # left as it was
    wrong = [known[:2] + (other, "drawn/x"), known[:2] + (other, "drawn/y"), known[:2] + (known[2], "drawn/y")]
    assert base_vqa_exact(model, processor, [known, *wrong]) == {
        "all": 50.0, "test": 100.0, known[3]: 100.0, "drawn": round(100 / 3, 1), "drawn/x": 0.0, "drawn/y": 50.0}


def test_demo_card_states_the_run_it_was_given_and_never_overwrites(tmp_path):
    """write_demo_card (the last step of python -m stamp_hf.synthetic.build --ship): the card carries the given run's figures
    and the verdict they earn, training leftovers stay behind, and an existing folder is refused."""
    from stamp_hf.synthetic.stages import write_demo_card
    from stamp_hf.testing import tiny_stamp

    model, processor = tiny_stamp(seed=0)
    run = tmp_path / "run"
    model.save_pretrained(run)
    processor.save_pretrained(run)
    (run / "checkpoint-10").mkdir()
    dialogue = dict(vqa_exact=93.0, chat_switch=91.0, multi_all_right=80.0, vqa_by_kind=dict(exists=60.0))
    metrics = dict(cIoU=71.2, gIoU=70.4, conversations=dialogue, **{"N-acc": 90.0})
    summary = dict(
        vision=dict(steps=5000, threads=2, history=[dict(kind=0.9, colour=1.0, size=0.99)]),
        dialogue=dict(steps=1000, history=[dict(answer_token_accuracy=0.95)]),
        stamp_v2=dict(steps=8000, seeded_from="an earlier build"), stamp=dict(steps=3000, learning_rate=5e-4),
        data=dict(records={"test.jsonl": 400, "drawn.jsonl": 380}),
        results={"test": dict(metrics, limit=200),
                 "drawn": dict(metrics, cIoU=66.0, conversations=dict(dialogue, chat_switch=88.0,
                                                                      vqa_by_kind=dict(exists=52.0)),
                               limit=200, **{"N-acc": 85.0})},
        references={"test": {"blind": {"cIoU": 30.0}}, "drawn": {"blind": {"cIoU": 35.0}}},
        timing_seconds=dict(vision=1200, dialogue=480, stamp_v2=1800, stamp=3600),
    )
    card = write_demo_card(run, tmp_path / "shipped", summary, "| the results table |", None)
    text = (card / "README.md").read_text()
    flat = " ".join(text.split())  # steps 1-2 are wrapped to the card's width wherever their figures fall
    assert "kind 90.0 %" in flat and "accuracy at the end 95.0 %" in flat
    assert "from a LLaVA-format export written through `stamp-hf prepare-data`" in flat
    for expected in ("| the results table |", "5000 steps of 16 scenes, 20.0 min",
                     "1000 steps of batch 8, 8.0 min", "8000 steps of batch 8, 30.0 min",
                     "3000 steps of batch 8, peak learning rate 0.0005,\n   60.0 min", "Whole training: 118.0 min",
                     "below the goal of cIoU and gIoU >= 85",
                     "Measured on the first 200 records of each held-out set (`--eval-limit 200`, for time). Stage 4's "
                     "model is an earlier build; stages 1-4 were not rerun for it.",
                     "Below its dialogue goals: a later segmentation request in a chat gets every mask right on 88 % of "
                     "turns (goal 90 %); a request naming several targets gets every mask right on 80 % of turns (goal "
                     "85 %). Its yes or no to \"Is there a ...?\" is right on 52 % of turns: ask for the mask instead, "
                     "which is empty for an absent target on 85 % of requests."):
        assert expected in text, expected
    assert "questions are answered exactly" not in text  # VQA 93 % on both sets: at its goal
    assert (card / "model.safetensors").exists() and not (card / "checkpoint-10").exists()
    reached = dict(vqa_exact=95.0, chat_switch=92.0, multi_all_right=90.0, vqa_by_kind=dict(exists=92.0))
    good = dict(summary, results={"test": dict(cIoU=90.0, gIoU=88.0, conversations=reached, limit=None, **{"N-acc": 95.0}),
                                  "drawn": dict(cIoU=86.0, gIoU=85.5, conversations=reached, limit=None, **{"N-acc": 96.0})},
                stamp_v2=dict(steps=8000),
                data=dict(records={"test.jsonl": 400, "drawn.jsonl": 380, "refer_train.jsonl": 20000,
                                   "dialogue_train.jsonl": 5000, "train.jsonl": 8000}),
                conversations=dict(data=dict(records=17000),
                                   train=dict(steps=4000, learning_rate=5e-4, seconds_this_run=4200)),
                timing_seconds=dict(summary["timing_seconds"], stamp_conversations=4200))
    good_card = (write_demo_card(run, tmp_path / "good", good, "", "| the ablation |") / "README.md").read_text()
    flat = " ".join(good_card.split())  # the steps are wrapped to the card's width
    assert ("6. `stamp-hf train` again from step 5's model (4000 steps of batch 8, peak learning rate 0.0005, 70.0 min)"
            in flat and "17000 of the 50000 records it trains on" in flat and "Whole training: 188.0 min" in flat)
    assert "7. `stamp-hf train`" not in good_card  # no rebalance run
    assert "6. `stamp-hf train`" not in text  # the first run had no third train
    assert "it reaches cIoU and gIoU >= 85" in good_card and "Below its dialogue goals" not in good_card
    assert "Is there a" not in good_card  # its yes/no is at the goal of a question kind: no advice
    assert "Measured on every record of both held-out sets (400 and 380)." in good_card
    assert "not rerun" not in good_card and "Table 6 ablation at this scale" in good_card and "| the ablation |" in good_card
    rebalanced = dict(good, stamp=dict(good["stamp"], seeded_from="summary.json at abc1234"),
                      conversations=dict(good["conversations"], train=dict(good["conversations"]["train"],
                                                                           seeded_from="summary.json at abc1234")),
                      rebalance=dict(steps=5000, learning_rate=2.5e-4, seconds_this_run=3300,
                                     repeats={"refer_train.jsonl": 2}),
                      timing_seconds=dict(good["timing_seconds"], stamp_rebalance=3300))
    flat = " ".join((write_demo_card(run, tmp_path / "rebalanced", rebalanced, "", None) / "README.md").read_text().split())
    assert ("7. `stamp-hf train` again from step 6's model (5000 steps of batch 8, peak learning rate 0.00025, 55.0 min) "
            "on step 6's mix with the referring export counted 2 times") in flat and "Whole training: 243.0 min" in flat
    assert ("Steps 5-6 are the ones recorded in summary.json at abc1234 (figures and times as measured then); this "
            "build ran only what follows them.") in flat
    first_round = dict(rebalanced["rebalance"], seeded_from="summary.json at abc1234",
                       log=[dict(mask_loss=0.3)] * 2 + [dict(mask_loss=0.28)] * 16 + [dict(mask_loss=0.24)] * 2)
    second_round = dict(steps=6000, learning_rate=1.25e-4, seconds_this_run=3000, seconds=4800,  # stopped, resumed:
                        repeats={"refer_train.jsonl": 2})  # the card gives both parts' time, not the last one's
    two_rounds = dict(rebalanced, rebalance=[first_round, second_round],
                      timing_seconds=dict(rebalanced["timing_seconds"], stamp_rebalance_2=4800))
    two_rounds_card = write_demo_card(run, tmp_path / "two-rounds", two_rounds, "", None) / "README.md"
    flat = " ".join(two_rounds_card.read_text().split())
    assert ("7. `stamp-hf train` again from step 6's model (5000 steps" in flat
            and "8. `stamp-hf train` again from step 7's model (6000 steps of batch 8, peak learning rate 0.000125, "
                "80.0 min), once more on step 7's mix, as step 7's mask loss went from 0.30 (its first tenth of steps) "
                "to 0.24 (its last)." in flat and "Whole training: 323.0 min" in flat)
    assert "Steps 5-7 are the ones recorded in summary.json at abc1234" in flat
    with pytest.raises(FileExistsError, match="already exists"):
        write_demo_card(run, tmp_path / "shipped", summary, "", None)


def test_dialogue_table_shows_both_sets_every_kind_move_and_target_count():
    """The build's dialogue table (card and README): a row per question kind, chat move and number of targets seen in
    either set, "-" where a set has none."""
    from stamp_hf.synthetic.build import dialogue_table

    def scores(vqa, moves, targets):
        return dict(vqa_samples=10, vqa_exact=80.0, vqa_by_kind=vqa, describe_names_every_shape=None,
                    chat_switch_samples=7, chat_switch=71.4, chat_switch_by_move=moves, multi_samples=4,
                    multi_all_right=50.0, multi_labels=100.0, multi_by_targets=targets)

    results = {"test": {"conversations": scores({"colour": 90.0, "count": 70.0}, {"refer_back": 60.0}, {"2": 50.0})},
               "drawn": {"conversations": scores({"colour": 85.0}, {"new_target": 75.0}, {"3": 25.0})}}
    lines = dialogue_table(results).splitlines()
    for row in ("| VQA exact, colour % | 90.0 | 85.0 |", "| VQA exact, count % | 70.0 | - |",
                "| chat switch, new_target % | - | 75.0 |", "| chat switch, refer_back % | 60.0 | - |",
                "| several targets, 2 of them: every mask right % | 50.0 | - |",
                "| several targets, 3 of them: every mask right % | - | 25.0 |",
                "| descriptions naming every shape with its colour % | - | - |",
                "| turns: VQA / chat switches / several targets | 10 / 7 / 4 | 10 / 7 / 4 |"):
        assert row in lines, row


def test_ablation_trains_every_variant_side_by_side_from_one_base_and_evaluates_each(tmp_path):
    """build --ablation --ablation-jobs 3 (Table 6): every variant starts from the same base with its config override
    written into its initialised model, the runs train side by side (one torch thread each, output in their own
    logs), and each is evaluated on both held-out sets with the limit it was given."""
    import argparse
    import shutil

    from stamp_hf.synthetic import build
    from stamp_hf.synthetic.stages import build_base, save_base

    save_base(*build_base(seed=0), tmp_path / "base" / "model")
    args = argparse.Namespace(out=tmp_path, refer_scenes=2, dialogue_scenes=2, chat_samples=4, test_samples=8,
                              drawn_samples=8, seeds=[0], ablation_steps=2, threads=2, ablation_jobs=3, eval_limit=2)
    build.data_stage(tmp_path, args, "v3")
    runs = build.ablation(args, build.data_folder(tmp_path, "v3"))
    assert list(runs) == list(build.VARIANTS)
    table = build.ablation_table(runs)
    for variant, (title, overrides) in build.VARIANTS.items():
        folder = tmp_path / f"ablation-v3-{variant}-0-2"
        config = json.loads((folder / "model" / "config.json").read_text())
        assert {key: config[key] for key in overrides} == overrides
        result = json.loads((folder / "result.json").read_text())
        assert (result["steps"], result["threads"], result["concurrent_runs"]) == (2, 1, 3)
        assert json.loads((folder / "model" / "trainer_state.json").read_text())["global_step"] == 2
        assert "train_runtime" in (folder / "train.log").read_text()
        [evaluated] = runs[variant]
        assert evaluated["test"]["limit"] == evaluated["drawn"]["limit"] == 2
        assert f"| {title} | 1 | {evaluated['test']['cIoU']:.1f} | {evaluated['test']['cIoU']:.1f} |" in table
    assert runs["stamp"][0]["test"]["vqa_exact"] is None  # the first two test records ask no question
    assert table.count("| n/a |") == len(build.VARIANTS)  # shown as such, not averaged
    assert "then 2 steps of batch 8 on the v3 data (seeds 0); 3 run(s) side by side, 1 torch thread(s) each" in table
    assert "resumed" not in table
    for rows in runs.values():  # one part each, timed
        training = rows[0]["training"]
        assert training["parts"] == [dict(from_step=0, to_step=2, seconds=training["seconds_this_run"])]
        assert training["seconds"] == training["seconds_this_run"]

    # stopped after the last checkpoint, before the stage's record: rerun, a stage resumes from that checkpoint, and
    # its time is both parts (the first up to when it saved that checkpoint); a run whose first part a build from
    # before parts were timed left (no parts.json) keeps only the last part's time, and the table says so
    started = {v: json.loads((tmp_path / f"ablation-v3-{v}-0-2" / "parts.json").read_text())[0]["started"]
               for v in ("stamp", "causal")}
    saved = {v: (tmp_path / f"ablation-v3-{v}-0-2" / "model" / "checkpoint-2" / "trainer_state.json").stat().st_mtime
             for v in ("stamp", "causal")}
    (tmp_path / "ablation-v3-stamp-0-2" / "result.json").unlink()
    for name in ("result.json", "parts.json"):
        (tmp_path / "ablation-v3-causal-0-2" / name).unlink()
    resumed = build.ablation(args, build.data_folder(tmp_path, "v3"))
    stamp, causal = (resumed[v][0]["training"] for v in ("stamp", "causal"))
    assert stamp["parts"][0] == dict(from_step=0, to_step=2, seconds=saved["stamp"] - started["stamp"])
    assert stamp["parts"][1] == dict(from_step=2, to_step=2, seconds=stamp["seconds_this_run"])
    assert stamp["seconds"] == sum(part["seconds"] for part in stamp["parts"]) > stamp["seconds_this_run"]
    assert causal["parts"][0] == dict(from_step=0, to_step=2, seconds=None) and causal["seconds"] is None
    assert resumed["nofusion"] == runs["nofusion"]  # not stopped: its record as it was
    assert ("(2 of the 3 runs stopped and resumed: 1 of them with only the last part's time (an earlier part was not "
            "timed))") in build.ablation_table(resumed)

    # seeded from a summary that holds these runs (seed_caches), a fresh --out reuses them: nothing trains again
    from stamp_hf.synthetic import seed_caches

    summary = dict(args=dict(v2_steps="2", steps="2", ablation_steps="2"), vision={}, dialogue={}, stamp_v2={},
                   stamp={}, ablation=runs)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    seeded = tmp_path / "seeded"
    seed_caches.seed(seeded, tmp_path / "summary.json", tmp_path / "base" / "model")
    reused = build.ablation(argparse.Namespace(**dict(vars(args), out=seeded)), build.data_folder(tmp_path, "v3"))
    assert not list(seeded.glob("ablation-*/model")) and not list(seeded.glob("ablation-*/train.log"))
    figures = lambda found: {v: [(r["test"], r["drawn"], r["training"]["seed"]) for r in rows]  # noqa: E731
                             for v, rows in found.items()}
    assert figures(reused) == figures(runs) and build.ablation_table(reused) == table
    # a seed the summary does not hold starts from the base, which the seeded cache lacks: its seeded record goes, so
    # that the build builds the base again, rather than `stamp-hf init` failing on a missing folder; the vision stage
    # was seeded with its model (from the model's frozen tower), so it stays and only the dialogue stage is rebuilt
    asks = lambda seeds: argparse.Namespace(**dict(vars(args), out=seeded, seeds=seeds))  # noqa: E731
    assert build.unseed_base_for_ablation(asks([0])) == [] and (seeded / "base" / "result.json").exists()
    assert build.unseed_base_for_ablation(asks([0, 1])) == ["base"]
    assert not (seeded / "base").exists() and (seeded / "base-vision" / "model" / "config.json").exists()
    shutil.rmtree(seeded / "base-vision" / "model")  # a cache seeded before the vision model was: both go
    (seeded / "base").mkdir()
    (seeded / "base" / "result.json").write_text(json.dumps(dict(seeded_from="summary.json at abc1234")))
    assert build.unseed_base_for_ablation(asks([0, 1])) == ["base-vision", "base"]
    assert not (seeded / "base").exists() and not (seeded / "base-vision").exists()
    assert build.unseed_base_for_ablation(asks([0, 1])) == []  # nothing seeded left to remove
    real_base = argparse.Namespace(**dict(vars(args), seeds=[0, 1]))  # tmp_path/base/model was built, not seeded
    assert build.unseed_base_for_ablation(real_base) == [] and (tmp_path / "base" / "model").exists()


def test_conversation_stage_trains_on_fresh_questions_chats_and_several_target_requests(tmp_path):
    """The build's third `stamp-hf train` (--conversation-steps): fresh v3 conversations of the kept tasks only, on
    seeds no other stage uses, added to the v3 mix; it goes on from the given model, not from a new init."""
    import argparse

    from stamp_hf.synthetic import build
    from stamp_hf.synthetic.scenes import SPLIT_SEEDS
    from stamp_hf.testing import tiny_stamp

    args = argparse.Namespace(refer_scenes=2, dialogue_scenes=2, chat_samples=4, test_samples=4, drawn_samples=2)
    build.data_stage(tmp_path, args, "v3")
    result = build.conversations_stage(tmp_path, 12)
    records = [json.loads(line) for line in (tmp_path / "data-v3-conversations" / "train.jsonl").open()]
    assert result["records"] == len(records) > 0 and {r["task"] for r in records} <= set(build.CONVERSATION_TASKS)
    used = {r["seed"] for name in ("train", "test") for r in map(json.loads, (tmp_path / "data-v3" / f"{name}.jsonl").open())}
    assert all(r["seed"] >= SPLIT_SEEDS["train"] + 3 * 10**6 for r in records) and not used & {r["seed"] for r in records}

    start = tmp_path / "start"
    model, processor = tiny_stamp(seed=0)
    model.save_pretrained(start)
    processor.save_pretrained(start)
    extra = str((tmp_path / "data-v3-conversations" / "train.jsonl").resolve())
    trained = build.stamp_stage(tmp_path, "third", build.data_folder(tmp_path, "v3"), tmp_path / "no-base", 1,
                                start_from=start, learning_rate=1e-4, extra_data=[extra])
    config = json.loads((tmp_path / "third" / "train.json").read_text())
    assert config["model"] == str(start.resolve()) and config["data"][-1] == extra and len(config["data"]) == 4
    assert not (tmp_path / "third" / "init").exists() and trained["learning_rate"] == 1e-4
    mix = sum(1 for name in ("refer_train", "dialogue_train", "train") for _ in (tmp_path / "data-v3" / f"{name}.jsonl").open())
    state = json.loads((tmp_path / "third" / "model" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and state["log_history"][-1]["epoch"] == pytest.approx(1 / math.ceil((mix + len(records)) / 8))

    # the vision tower (ViT and merger) trains only in a stage that asks for it, and the cache tells the two apart
    from safetensors.torch import load_file

    assert config["freeze_vision_tower"] is True and trained["train_vision_tower"] is False
    before = load_file(start / "model.safetensors")
    for stage, vision_trains in (("frozen", False), ("with-vision", True)):  # 2 steps: the first one's warm-up LR is 0
        record = build.stamp_stage(tmp_path, stage, build.data_folder(tmp_path, "v3"), tmp_path / "no-base", 2,
                                   start_from=start, learning_rate=1e-3, extra_data=[extra],
                                   train_vision_tower=vision_trains)
        assert json.loads((tmp_path / stage / "train.json").read_text())["freeze_vision_tower"] is not vision_trains
        assert record["train_vision_tower"] is vision_trains
        after = load_file(tmp_path / stage / "model" / "model.safetensors")
        changed = {key for key in before if not torch.equal(after[key], before[key])}
        assert any("visual." not in key for key in changed), stage  # it trained
        assert any("visual." in key for key in changed) is vision_trains, (stage, sorted(changed)[:5])
    with pytest.raises(SystemExit, match="train_vision_tower"):
        build.stamp_stage(tmp_path, "frozen", build.data_folder(tmp_path, "v3"), tmp_path / "no-base", 2,
                          start_from=start, learning_rate=1e-3, extra_data=[extra], train_vision_tower=True)

    # `files`: a stage on one file of the data folder alone (benchmarks/demo_existence.py) trains on its records only
    build.stamp_stage(tmp_path, "one-file", build.data_folder(tmp_path, "v3"), tmp_path / "no-base", 1,
                      start_from=start, learning_rate=1e-4, files=("train.jsonl",))
    one_file = json.loads((tmp_path / "one-file" / "train.json").read_text())["data"]
    assert one_file == [str((tmp_path / "data-v3" / "train.jsonl").resolve())]
    chats = sum(1 for _ in (tmp_path / "data-v3" / "train.jsonl").open())
    state = json.loads((tmp_path / "one-file" / "model" / "trainer_state.json").read_text())
    assert state["log_history"][-1]["epoch"] == pytest.approx(1 / math.ceil(chats / 8))


def test_a_stage_stopped_before_its_first_checkpoint_starts_its_timing_again(tmp_path):
    """A `stamp-hf train` part stopped before it saved any checkpoint left an open part in parts.json; the rerun
    trains every step again, so only the new part is timed (the open one once made the stage's record fail)."""
    from stamp_hf.synthetic.build import start_training_part

    (tmp_path / "model").mkdir()
    (tmp_path / "parts.json").write_text(json.dumps([dict(from_step=0, started=1.0)]))
    parts = start_training_part(tmp_path, resume=False)
    assert len(parts) == 1 and parts[0]["from_step"] == 0 and parts[0]["started"] > 1.0
    assert json.loads((tmp_path / "parts.json").read_text()) == parts


def test_questions_stage_gathers_every_question_only_record_of_the_v3_training_data(tmp_path):
    """--dialogue-data questions-v3: the dialogue stage's data is every question-only record (no mask, task vqa) of
    the v3 LLaVA export, the generator's train split and the extra conversations, images made absolute; cached with
    the conversation samples it was built for."""
    import argparse

    from stamp_hf.synthetic import build

    args = argparse.Namespace(out=tmp_path, refer_scenes=2, dialogue_scenes=3, chat_samples=12, test_samples=4,
                              drawn_samples=2, conversation_samples=12, dialogue_data="questions-v3")
    questions = build.dialogue_data(args)
    records = [json.loads(line) for line in questions.open()]
    sources = [tmp_path / "data-v3" / "dialogue_train.jsonl", tmp_path / "data-v3" / "train.jsonl",
               tmp_path / "data-v3-conversations" / "train.jsonl"]
    expected = [(r["messages"], (source.parent / r["image"]).resolve()) for source in sources
                for r in map(json.loads, source.open()) if r.get("task", "vqa") == "vqa" and not r.get("masks")]
    assert [(r["messages"], Path(r["image"])) for r in records] == expected and len(expected) > 3
    assert all(Path(r["image"]).is_file() for r in records)
    assert not any("<|seg|>" in m["content"] for r in records for m in r["messages"])
    assert {r["task"] for r in records if "task" in r} == {"vqa"} and any("task" not in r for r in records)
    with pytest.raises(SystemExit, match="questions-v3 was built with conversation_samples=12"):
        build.questions_stage(tmp_path, argparse.Namespace(**dict(vars(args), conversation_samples=0)))
    assert build.dialogue_data(argparse.Namespace(**dict(vars(args), dialogue_data="llava-v2"))) == \
        tmp_path / "data" / "dialogue_train.jsonl"


def test_a_base_cached_before_its_settings_were_recorded_counts_as_built_with_the_earlier_ones(tmp_path):
    """A base-vision or base record from before --vision-targets / --dialogue-data / --dialogue-learning-rate existed
    was built with shape targets, the v2 LLaVA export and 1e-3: reused when a run asks the same, refused by name (not
    reused silently) when it asks otherwise."""
    import argparse

    from stamp_hf.synthetic import build

    for stage, record in (("base-vision", dict(steps=2)), ("base", dict(steps=2))):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "result.json").write_text(json.dumps(dict(record, history=[])))
    assert build.vision_stage(tmp_path, 2, ["kind", "colour", "size"])["targets"] == ["kind", "colour", "size"]
    with pytest.raises(SystemExit, match=r"base-vision was built with targets=\['kind', 'colour', 'size'\]"):
        build.vision_stage(tmp_path, 2, ["kind", "colour", "size", "column", "row", "centre"])
    args = argparse.Namespace(out=tmp_path, dialogue_steps=2, dialogue_data="llava-v2", dialogue_learning_rate=1e-3)
    assert build.dialogue_stage(args)["data"] == "llava-v2"
    with pytest.raises(SystemExit, match=r"base was built with learning_rate=0.001 but this run asks learning_rate=0.002"):
        build.dialogue_stage(argparse.Namespace(**dict(vars(args), dialogue_learning_rate=2e-3)))
    assert {p.name for p in tmp_path.iterdir()} == {"base-vision", "base"}  # nothing built, nothing removed


def test_the_build_runs_every_stage_in_one_command_and_a_rerun_reuses_them(tmp_path, capsys):
    """`python -m stamp_hf.synthetic.build --ship DIR` from nothing, at toy sizes: data, vision, dialogue, the five
    `stamp-hf train` runs (v2, v3, v3 plus fresh conversations, two rebalance rounds), the evaluation and the card; the
    shipped model loads and answers. Run again, every stage comes from its cache (nothing retrained); run with a
    changed setting, the stale stage is refused by name. Seeded from the summary and the shipped model
    (stamp_hf.synthetic.seed_caches), a fresh --out trains nothing and measures the same figures, and holds the
    vision stage's model exactly as the build saved it."""
    from transformers import AutoModel, AutoProcessor

    from stamp_hf.synthetic import build, seed_caches
    from stamp_hf.synthetic.stages import single_questions

    out, ship = tmp_path / "runs", tmp_path / "shipped"
    argv = ["--out", str(out), "--vision-steps", "2", "--vision-targets", "kind", "colour", "size", "column", "row",
            "centre", "--dialogue-steps", "2", "--dialogue-data", "questions-v3", "--v2-steps", "2", "--steps", "2",
            "--conversation-steps", "2", "--conversation-samples", "6", "--rebalance-steps", "2", "2",
            "--refer-scenes", "2", "--dialogue-scenes", "8", "--chat-samples", "4", "--test-samples", "4",
            "--drawn-samples", "4", "--eval-limit", "2"]
    summary = build.main([*argv, "--ship", str(ship)])
    third, fourth = out / "stamp-2-v3-2-conversations-2", out / "stamp-2-v3-2-conversations-2-rebalance-2"
    final = out / f"{fourth.name}-rebalance-2"
    assert json.loads((third / "train.json").read_text())["model"] == str((out / "stamp-2-v3-2" / "model").resolve())
    rebalance = json.loads((fourth / "train.json").read_text())
    assert rebalance["model"] == str((third / "model").resolve()) and rebalance["training"]["learning_rate"] == 2.5e-4
    assert rebalance["data"][0] == dict(path=str((out / "data-v3" / "refer_train.jsonl").resolve()), repeat=2)
    rest = [out / "data-v3" / "dialogue_train.jsonl", out / "data-v3" / "train.jsonl",
            out / "data-v3-conversations" / "train.jsonl"]
    assert rebalance["data"][1:] == [str(path.resolve()) for path in rest]
    last = json.loads((final / "train.json").read_text())  # the second round: from the first, half its learning rate
    assert last["model"] == str((fourth / "model").resolve()) and last["training"]["learning_rate"] == 1.25e-4
    assert last["data"] == rebalance["data"]
    assert summary["conversations"]["train"]["steps"] == 2 and [r["steps"] for r in summary["rebalance"]] == [2, 2]
    assert summary["results"]["test"]["limit"] == 2
    assert set(summary["timing_seconds"]) == {"vision", "dialogue", "stamp_v2", "stamp", "stamp_conversations",
                                              "stamp_rebalance", "stamp_rebalance_2"}
    card = (ship / "README.md").read_text()
    assert "6. `stamp-hf train` again from step 5's model (2 steps of batch 8" in card
    assert "7. `stamp-hf train` again from step 6's model (2 steps of batch 8, peak learning rate 0.00025" in card
    assert "8. `stamp-hf train` again from step 7's model (2 steps of batch 8, peak learning rate 0.000125" in card
    steps = card[card.index("**How it was built**"):card.index("Whole training")]
    assert "the referring export counted 2 times" in steps and max(map(len, steps.splitlines())) <= 120
    assert set(summary["vision"]["history"][-1]) == {"step", "kind", "colour", "size", "column", "row", "centre"}
    flat = " ".join(steps.split())
    assert "row of its shape's centre (of 8) and whether it holds a shape's centre" in flat
    assert "from every question of the v3 training data" in flat and summary["dialogue"]["data"] == "questions-v3"
    asked = single_questions(out / "data-v3")
    answers = summary["base_answers"]
    assert asked and answers["records"] == len(asked)
    assert set(answers["exact"]) == {"all", *(key for *_, key in asked), *(key.split("/")[0] for *_, key in asked)}
    assert f"Asked the held-out sets' {len(asked)} single-question records, it answered exactly " in flat
    assert (ship / "model.safetensors").is_file() and not list(ship.glob("checkpoint-*"))
    model = AutoModel.from_pretrained(ship, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(ship, trust_remote_code=True)
    assert model.config.model_type == "stamp"
    assert model.config.seg_token_id == processor.tokenizer.convert_tokens_to_ids("<|seg|>") == len(processor.tokenizer) - 4
    printed = capsys.readouterr().out
    assert "| cIoU |" in printed and "| every turn of every record |" in printed
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    assert {p.parent.name for p in stamps} == {"data", "data-v3", "data-v3-conversations", "questions-v3",
                                               "base-vision", "base", "base-answers", "stamp-2", "stamp-2-v3-2", third.name,
                                               fourth.name, final.name}
    again = build.main(argv)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")} == stamps
    assert again["results"] == summary["results"]
    changed = [a if a != "6" else "7" for a in argv]  # --conversation-samples 7: its data stage is stale
    with pytest.raises(SystemExit, match=r"data-v3-conversations was built with samples=6 but this run asks samples=7"):
        build.main(changed)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")} == stamps

    seeded_out = tmp_path / "seeded"
    seed_caches.main(["--out", str(seeded_out), "--summary", str(out / "summary.json"), "--model", str(ship)])
    seeded = {p: p.read_text() for p in seeded_out.glob("*/result.json")}
    assert {p.parent.name for p in seeded} == {"base-vision", "base", "base-answers", "stamp-2", "stamp-2-v3-2",
                                               third.name, fourth.name, final.name}
    assert all(json.loads(text)["seeded_from"].startswith("summary.json at ") for text in seeded.values())
    # the vision stage's model, rebuilt from the shipped one, is the one the vision stage saved, file for file
    files = lambda folder: {f.name: f.read_bytes() for f in (folder / "base-vision" / "model").iterdir()}  # noqa: E731
    assert files(seeded_out) == files(out)
    rebuilt = build.main([*argv[:1], str(seeded_out), *argv[2:], "--ship", str(tmp_path / "reshipped")])
    assert {p: p.read_text() for p in seeded_out.glob("*/result.json") if p in seeded} == seeded  # nothing retrained
    def figures(results):  # the evaluation's measurements, not its time
        return {name: {k: v for k, v in result.items() if k != "seconds"} for name, result in results.items()}

    assert figures(rebuilt["results"]) == figures(summary["results"]) and rebuilt["references"] == summary["references"]
    assert rebuilt["base_answers"]["exact"] == answers["exact"]  # seeded: the base itself is not there to score
    assert "Steps 5-8 are the ones recorded in summary.json at " in (tmp_path / "reshipped" / "README.md").read_text()
    with pytest.raises(SystemExit, match="already there"):
        seed_caches.main(["--out", str(seeded_out), "--summary", str(out / "summary.json"), "--model", str(ship)])
