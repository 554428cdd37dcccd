"""`stamp-hf prepare-data` on files written by hand in each public format: record counts, the paper's templates,
masks that decode to the evaluation loader's pixels, gRefCOCO no-target records, LLaVA conversations, one-line
errors that write nothing, byte-identical re-runs and --force; training on the result; the shipped recipes. On
generated inputs: the streamed reading writes the bytes of the whole-file reading it replaced, and prepare-data on a
200k-sample LLaVA file stays in a small, stated memory bound that the whole-file reading exceeds."""

import dataclasses
import filecmp
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from example_scene import without_module
from paper_scale_data import peak_rss_mib, prepare_in_memory, write_llava_file, write_refer_folder
from refer_data import GREFS, REFS, write_grefcoco, write_llava, write_reasonseg_annotation, write_refer
from shapes_data import one_thread  # noqa: F401 (fixture)
from stamp_hf.cli import main as cli
from stamp_hf.data import STAMPDataset, load_mask, read_records
from stamp_hf.evaluation import _sample_masks, load_grefcoco, load_reasonseg, load_refer
from stamp_hf.prepare import prepare_data
from stamp_hf.training import TrainConfig

# Prompt S1 and S2 as printed in the paper's appendix ([class_name] -> {}); see stamp_hf.prompts for the two
# typesetting slips (answer 9 printed without <|seg|>, a curly apostrophe)
PAPER_RES_QUESTIONS = {
    "Please segment only the {} in the image.", "Can you segment the {} in the image?",
    "Where is the {} in this picture? Please respond with segmentation mask.",
    "Where is {} in this image? Please output segmentation mask.",
    "Could you provide the segmentation mask for {} in this image?", "Please segment the image and highlight {}.",
}
PAPER_RES_ANSWERS = {
    "Sure, here is the segmentation mask for {} <|seg|>:", "Here is the segmentation mask focusing on the {} <|seg|>:",
    "Here is the segmentation mask highlighting the {} <|seg|>:", "The segmentation map for {} <|seg|> is:",
    "The segmentation mask for {} <|seg|> is shown below:", "Sure, Here's the segmentation mask for {} <|seg|>:",
    "Sure, the segmented output for {} <|seg|> is:", "Certainly, the segmentation map for {} <|seg|> is:",
    "Certainly, here is the segmentation mask for {} <|seg|>:",
}
PAPER_REASON_QUESTIONS = {"Can you segment the {} in this image?", "Please segment the {} in this image.",
                          "What is {} in this image? Please output segmentation mask."}
PAPER_REASON_ANSWERS = {"<|seg|>.", "Sure, <|seg|>.", "Sure, the segmentation result is <|seg|>."}


def records_of(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def shown(err: str) -> str:
    """What a terminal shows of `err`: each line as its last carriage return leaves it (the progress bar redraws and
    clears itself with carriage returns)."""
    return "\n".join(line.rsplit("\r", 1)[-1].rstrip() for line in err.split("\n"))


def template_of(text, sentence, templates):
    """Which template `text` is, with `sentence` in the place of {}."""
    matches = [t for t in templates if t.format(sentence) == text]
    assert matches, f"{text!r} is none of the templates"
    return matches[0]


def assert_same_pixels(records, samples, size):
    """Each record's mask decodes to the target the evaluation loader builds for the same sentence."""
    by_id = {s.id: s for s in samples}
    for record in records:
        (spec,) = record["masks"]
        target, _ = _sample_masks(by_id[record["id"]], size)
        assert np.array_equal(load_mask(spec, size, Path("."), record["id"]), target), record["id"]


@pytest.fixture
def refer(tmp_path):
    return write_refer(tmp_path / "refcoco", image_root=tmp_path / "train2014"), tmp_path / "train2014"


def prepare_refer(refer, output, *extra):
    root, images = refer
    return cli(["prepare-data", "--data", str(root), "--split", "train", "--images", str(images), "--allow-pickle",
                "--output", str(output), *extra])


def test_refer_gives_one_record_per_sentence_with_the_papers_templates_and_the_eval_pixels(refer, tmp_path, capsys):
    output = tmp_path / "out" / "refcoco.jsonl"
    assert prepare_refer(refer, output) == 0
    bar, summary = shown(capsys.readouterr().err).splitlines()
    assert summary.endswith("wrote 3 records from 2 refer sources to " + str(output))
    # the progress bar's last state, left on stderr: records written, references read
    assert bar.startswith("prepare-data: 3 records [") and bar.endswith(", 2 references read]"), bar
    records = records_of(output)
    train = [(ref["ref_id"], s["sent_id"], s["sent"]) for ref in REFS if ref["split"] == "train" for s in ref["sentences"]]
    assert [r["id"] for r in records] == [f"{ref_id}_{sent_id}" for ref_id, sent_id, _ in train]  # refs x sentences
    for record, (_, _, sentence) in zip(records, train):
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        template_of(user["content"], sentence, PAPER_RES_QUESTIONS)
        template_of(assistant["content"], sentence, PAPER_RES_ANSWERS)
        assert set(record["masks"][0]) == {"rle"} and isinstance(record["masks"][0]["rle"]["counts"], str)
        assert Path(record["image"]).is_absolute() and Path(record["image"]).is_file()  # referenced, not copied
    assert not list((tmp_path / "out").glob("*.jpg"))
    samples = load_refer(refer[0], "train", image_root=refer[1], allow_pickle=True)
    assert_same_pixels(records, samples, (60, 40))
    # the training format reads it as it is
    assert [len(r.masks) for r in read_records(output)] == [1, 1, 1]


def test_templates_are_drawn_with_the_seed_from_the_whole_lists(refer, tmp_path):
    assert prepare_refer(refer, tmp_path / "a.jsonl", "--repeats", "200") == 0
    records = records_of(tmp_path / "a.jsonl")
    assert len(records) == 3 * 200 and records[0]["id"] == "2_3_0" and records[199]["id"] == "2_3_199"
    sentences = {f"{ref['ref_id']}_{s['sent_id']}": s["sent"] for ref in REFS for s in ref["sentences"]}
    questions, answers = set(), set()
    for record in records:
        sentence = sentences[record["id"].rsplit("_", 1)[0]]
        questions.add(template_of(record["messages"][0]["content"], sentence, PAPER_RES_QUESTIONS))
        answers.add(template_of(record["messages"][1]["content"], sentence, PAPER_RES_ANSWERS))
    assert questions == PAPER_RES_QUESTIONS and answers == PAPER_RES_ANSWERS  # 600 draws reach every template
    assert prepare_refer(refer, tmp_path / "b.jsonl", "--repeats", "200", "--seed", "1") == 0
    other = records_of(tmp_path / "b.jsonl")
    assert [r["masks"] for r in other] == [r["masks"] for r in records]
    assert [r["messages"] for r in other] != [r["messages"] for r in records]  # another seed, other draws


def test_same_arguments_write_the_same_bytes_and_force_is_needed_to_overwrite(refer, tmp_path, capsys):
    output = tmp_path / "refcoco.jsonl"
    assert prepare_refer(refer, output) == 0
    first = output.read_bytes()
    capsys.readouterr()
    assert prepare_refer(refer, output, "--seed", "5") == 2
    err = capsys.readouterr().err
    assert f"{output} exists; pass --force" in err and err.count("\n") == 1
    assert output.read_bytes() == first  # untouched
    assert prepare_refer(refer, output, "--force") == 0
    assert output.read_bytes() == first  # the same bytes again
    assert prepare_refer(refer, output, "--force", "--seed", "5") == 0 and output.read_bytes() != first
    with pytest.raises(FileExistsError, match="exists; pass --force"):
        prepare_data(refer[0], output, "train", refer[1], allow_pickle=True)


def test_grefcoco_multi_target_union_and_no_target_empty_mask(tmp_path):
    root = write_grefcoco(tmp_path / "grefcoco")
    result = prepare_data(root, tmp_path / "grefcoco.jsonl", "val")
    assert (result["format"], result["records"], result["sources"]) == ("grefcoco", 3, 2)
    records = records_of(tmp_path / "grefcoco.jsonl")
    assert [r["id"] for r in records] == ["0_0", "1_1", "1_2"]
    both, *no_target = records
    assert len(both["masks"]) == 1 and both["messages"][1]["content"].count("<|seg|>") == 1  # one <|seg|>, one mask
    union = load_mask(both["masks"][0], (60, 40), tmp_path, "union")
    assert union[11:20, 11:30].all() and union[:, 50].all()  # the polygon of one object and the line of the other
    for record, ref_sentence in zip(no_target, GREFS[1]["sentences"]):
        assert record["masks"] == [{"empty": True}]  # nothing matches: an empty mask, the same kind of answer
        template_of(record["messages"][1]["content"], ref_sentence["sent"], PAPER_RES_ANSWERS)
    assert_same_pixels(records, load_grefcoco(root, "val"), (60, 40))
    # the images sit under the output's folder: referenced relative to it
    assert both["image"] == "grefcoco/COCO_train2014_000000000001.jpg"


def test_reasonseg_gives_one_record_per_query_with_prompt_s2(tmp_path):
    folder = tmp_path / "ReasonSeg" / "train"
    write_reasonseg_annotation(folder, "a", (50, 30), ["the thing used to tell time", "what shows the hour"], True,
                               [("target", [[0, 0], [20, 0], [20, 10], [0, 10]]),
                                ("ignore", [[30, 0], [50, 0], [50, 30], [30, 30]])])
    write_reasonseg_annotation(folder, "b", (50, 30), ["clock"], False,
                               [("target", [[10, 10], [40, 10], [40, 25], [10, 25]])])
    output = tmp_path / "reasonseg.jsonl"
    assert cli(["prepare-data", "--data", str(tmp_path / "ReasonSeg"), "--split", "train", "--output", str(output)]) == 0
    records = records_of(output)
    assert [r["id"] for r in records] == ["a_0", "a_1", "b_0"]
    assert records[0]["messages"][0]["content"] == "the thing used to tell time Please respond with segmentation mask."
    assert records[1]["messages"][0]["content"] == "what shows the hour Please respond with segmentation mask."
    template_of(records[2]["messages"][0]["content"], "clock", PAPER_REASON_QUESTIONS)
    assert all(r["messages"][1]["content"] in PAPER_REASON_ANSWERS for r in records)
    # the first query of each image is the evaluation's sample; the ignore region is background in training
    samples = {s.id: s for s in load_reasonseg(tmp_path / "ReasonSeg", "train")}
    for record in (records[0], records[2]):
        target, _ = _sample_masks(samples[record["id"].split("_")[0]], (50, 30))
        assert np.array_equal(load_mask(record["masks"][0], (50, 30), tmp_path, record["id"]), target)
    assert records[0]["masks"] == records[1]["masks"]
    assert not load_mask(records[0]["masks"][0], (50, 30), tmp_path, "a")[:, 31:].any()  # "ignore": background


def test_llava_conversations_become_multi_turn_vqa_records(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "llava" / "coco" / "train2017").mkdir(parents=True)
    for name in ("1.jpg", "2.jpg"):
        Image.new("RGB", (56, 56)).save(tmp_path / "llava" / "coco" / "train2017" / name)
    samples = [
        {"id": "a", "image": "coco/train2017/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Black."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "b", "image": "coco/train2017/2.jpg", "conversations": [
            {"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "Dark."}]},
    ]
    data = write_llava(tmp_path / "llava" / "llava_v1_5_mix665k.json", samples)
    output = tmp_path / "llava.jsonl"
    assert cli(["prepare-data", "--data", str(data), "--images", str(tmp_path / "llava"), "--output", str(output)]) == 0
    err = capsys.readouterr().err
    assert "wrote 2 records from 2 llava sources" in err and "1 text-only samples left out" in err
    assert "prepare-data: 2 records [" in err and ", 3 samples read, 1 left out]" in err
    records = records_of(output)
    assert records[0] == {"id": "a", "image": "llava/coco/train2017/1.jpg", "messages": [
        {"role": "user", "content": "What is in the picture?"}, {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": "Black."}]}
    assert records[1]["messages"][0] == {"role": "user", "content": "Describe it."}
    assert all("masks" not in r for r in records)
    assert [r.messages for r in read_records(output)] == [r["messages"] for r in records]


def bad_inputs(tmp_path):
    """(arguments, the line's expected text) for inputs that must be refused."""
    images = tmp_path / "images"
    missing_image = write_refer(tmp_path / "missing_image", image_root=images)
    (images / "COCO_train2014_000000000002.jpg").unlink()
    refs = [dict(REFS[2], ann_id=99)]  # a train reference whose annotation instances.json lacks
    no_mask = write_refer(tmp_path / "no_mask", refs=refs, image_root=tmp_path / "images2")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "notes.txt").write_text("hello")
    instances_only = tmp_path / "instances_only"  # a COCO folder without refs is not taken for ReasonSeg
    instances_only.mkdir()
    (instances_only / "instances.json").write_text("{}")
    bad_refs = write_refer(tmp_path / "bad_refs", refs=[{"ref_id": 0, "split": "train"}], image_root=tmp_path / "i3")
    llava = write_llava(tmp_path / "llava.json", [{"image": "nowhere.jpg", "conversations": [
        {"from": "human", "value": "<image> Hi"}, {"from": "gpt", "value": "Hello."}]}])
    # streamed files that break after records were written: at sample 2, at the third turn of sample 1, at a reference
    good = {"image": "1.jpg",
            "conversations": [{"from": "human", "value": "<image> Hi"}, {"from": "gpt", "value": "Yo"}]}
    (tmp_path / "1.jpg").touch()
    not_a_list = tmp_path / "not_a_list.json"
    not_a_list.write_text(json.dumps({"samples": [good]}))
    truncated = tmp_path / "truncated.json"
    truncated.write_text(json.dumps([good, good])[:-1] + ', {"image": "1.jpg", "conversations" [')
    bad_turn = write_llava(tmp_path / "bad_turn.json",
                           [good, dict(good, conversations=[*good["conversations"], {}]), good])
    grefs = write_grefcoco(tmp_path / "bad_grefs", [dict(ref, split="train") for ref in GREFS])
    (grefs / "grefs(unc).json").write_text((grefs / "grefs(unc).json").read_text()[:-20])
    broken_instances = write_grefcoco(tmp_path / "broken_instances", [dict(ref, split="train") for ref in GREFS])
    (broken_instances / "instances.json").write_text((broken_instances / "instances.json").read_text()[:-2])
    return [
        (["--data", str(missing_image), "--split", "train", "--images", str(images), "--allow-pickle"],
         r"ref 3: image .*COCO_train2014_000000000002.jpg not found"),
        (["--data", str(no_mask), "--split", "train", "--images", str(tmp_path / "images2"), "--allow-pickle"],
         r"ref 2 has no mask: its annotation 99 is not in instances.json"),
        (["--data", str(no_mask), "--split", "train"], r"refs\(unc\).p is a pickle.*--allow-pickle"),
        (["--data", str(unknown), "--split", "train"], r"unknown: not a known dataset format"),
        (["--data", str(instances_only)], r"instances_only: not a known dataset format"),
        (["--data", str(bad_refs), "--split", "train", "--allow-pickle"],
         r"refs\(unc\).p: reference 0 is not in the REFER format \(KeyError: 'image_id'\)"),
        (["--data", str(llava)], r"llava.json: sample 0: image .*nowhere.jpg not found"),
        (["--data", str(missing_image), "--images", str(images), "--allow-pickle"], r"needs a split \(--split train\)"),
        (["--data", str(not_a_list)], r"not_a_list.json: not the LLaVA instruction format \(a JSON list of"),
        (["--data", str(truncated)], r"truncated.json: not valid JSON at sample 2 \(parse error: .*\)$"),
        (["--data", str(bad_turn)], r"bad_turn.json: sample 1: each turn needs 'from' \(human, gpt\)"),
        (["--data", str(grefs), "--split", "train"], r"grefs\(unc\).json: not valid JSON at reference 2 \(parse error"),
        (["--data", str(broken_instances), "--split", "train"], r"instances.json: not valid JSON \(parse error"),
    ]


def test_bad_inputs_give_one_line_and_write_nothing(tmp_path, capsys):
    output = tmp_path / "out" / "data.jsonl"
    for arguments, message in bad_inputs(tmp_path):
        assert cli(["prepare-data", *arguments, "--output", str(output)]) == 2, message
        err = shown(capsys.readouterr().err)  # the bar, if it started, is cleared: the error is all that stays
        assert re.search(message, err.strip()) and err.count("\n") == 1, err
        assert err.startswith("stamp-hf prepare-data: error:"), err
        assert not output.parent.exists()  # no file, no temporary file, not the folder made for them
        # the Python API raises the same text
        options = dict(zip(arguments[::2], arguments[1::2]))
        with pytest.raises((ValueError, OSError), match=message):
            prepare_data(options["--data"], output, options.get("--split"), options.get("--images"),
                         allow_pickle="--allow-pickle" in arguments)


def test_missing_ijson_is_one_line_with_the_pip_command(tmp_path):
    data = write_llava(tmp_path / "llava.json", [])
    result = without_module("ijson", ["prepare-data", "--data", str(data), "--output", str(tmp_path / "out.jsonl")])
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "needs ijson: pip install 'stamp-hf[train]'" in result.stderr and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("kind", ["llava", "refer", "grefcoco"])
def test_streamed_reading_writes_the_bytes_of_the_whole_file_reading(tmp_path, kind):
    """Generated inputs (escapes, non-ASCII, float polygons, RLE crowds, multi- and no-target references, text-only
    samples, number ids): the streaming readers give the bytes of the reading they replaced (json.load / pickle.load
    of whole files, restated in paper_scale_data.prepare_in_memory)."""
    if kind == "llava":
        data, images = write_llava_file(tmp_path / "llava" / "mix.json", 3000), tmp_path / "llava"
        arguments = {}
    else:
        data, images = write_refer_folder(tmp_path / kind, 1500, grefcoco=kind == "grefcoco",
                                          image_root=tmp_path / "train2014"), tmp_path / "train2014"
        arguments = {"split": "train", "seed": 3, "repeats": 2}
    result = prepare_data(data, tmp_path / "streamed.jsonl", images=images, allow_pickle=True, progress=False,
                          **arguments)
    count = prepare_in_memory(data, tmp_path / "in_memory.jsonl", images=images, **arguments)
    assert result["records"] == count > 1000
    assert filecmp.cmp(tmp_path / "streamed.jsonl", tmp_path / "in_memory.jsonl", shallow=False)


# prepare-data on 200k generated LLaVA samples (46 MiB of JSON), each reading in its own process, peak RSS (VmHWM):
# streaming measured 42.9 MiB (the interpreter and the command's imports alone: 39 MiB), the whole-file reading
# 422.6 MiB, on this project's 2-core CPU machine. The bound sits well above the first and far below the second: a
# reader that held the file, or every record, would cross it.
LLAVA_SAMPLES = 200_000
PEAK_RSS_BOUND_MIB = 100


def test_prepare_data_on_200k_llava_samples_stays_in_a_memory_bound(tmp_path):
    data = write_llava_file(tmp_path / "llava" / "mix.json", LLAVA_SAMPLES, turns=1, answer_chars=100)
    arguments = ["prepare-data", "--data", str(data), "--images", str(tmp_path / "llava"), "--output",
                 str(tmp_path / "streamed.jsonl")]
    reference = f"import paper_scale_data; paper_scale_data.prepare_in_memory({str(data)!r}, " \
                f"{str(tmp_path / 'in_memory.jsonl')!r}, images={str(tmp_path / 'llava')!r})"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    (status, err, streamed), (reference_status, reference_err, in_memory) = peak_rss_mib(
        f"from stamp_hf.cli import main; sys.exit(main({arguments!r}))", reference, env=env)
    assert status == 0 and reference_status == 0, err + reference_err
    records = LLAVA_SAMPLES - LLAVA_SAMPLES // 16  # every 16th sample is text-only
    assert f"wrote {records} records from {records} llava sources" in err
    # the bar's last state, also when stderr is not a terminal
    assert f"prepare-data: {records} records [" in err
    assert f"{LLAVA_SAMPLES} samples read, {LLAVA_SAMPLES // 16} left out]" in err
    assert filecmp.cmp(tmp_path / "streamed.jsonl", tmp_path / "in_memory.jsonl", shallow=False)
    assert streamed < PEAK_RSS_BOUND_MIB < in_memory, (streamed, in_memory)


def test_train_runs_on_prepare_data_output(tmp_path, refer):
    """stamp-hf train on what prepare-data wrote (REFER + gRefCOCO + LLaVA, several files read as one)."""
    from stamp_hf.testing import tiny_stamp

    model, processor = tiny_stamp(seed=0)
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    assert prepare_refer(refer, tmp_path / "data" / "refcoco.jsonl") == 0
    prepare_data(write_grefcoco(tmp_path / "grefcoco"), tmp_path / "data" / "grefcoco.jsonl", "val")
    dataset = STAMPDataset([tmp_path / "data" / "refcoco.jsonl", tmp_path / "data" / "grefcoco.jsonl"], processor)
    assert len(dataset) == 6
    item = dataset[4]  # the first no-target sentence: one all-background mask label
    assert item["mask_labels"].shape[0] == 1 and not item["mask_labels"].any()
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tmp_path / "base"), "data": ["data/refcoco.jsonl", "data/grefcoco.jsonl"], "output_dir": "run",
        "training": {"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0,
                     "save_strategy": "no", "use_cpu": True, "logging_steps": 1, "activation_checkpointing": False},
    }))
    assert cli(["train", str(config)]) == 0
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(steps) == 3 and all(np.isfinite(e["loss"]) and e["mask_loss"] > 0 for e in steps)
    assert (tmp_path / "run" / "model.safetensors").exists()


CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Table S1 of the paper, per recipe: (base or previous stage, epochs, learning rate, finetuning)
TABLE_S1 = {
    "stamp-2b-refcoco.yaml": ("Qwen/Qwen2-VL-2B-Instruct", 3, 3e-5, "full"),
    "stamp-2b-grefcoco.yaml": ("runs/stamp-2b-refcoco", 2, 3e-5, "full"),
    "stamp-7b-lora.yaml": ("Qwen/Qwen2-VL-7B-Instruct", 3, 2e-5, "lora"),
    "stamp-7b-lora-grefcoco.yaml": ("runs/stamp-7b-lora", 2, 2e-5, "lora"),
    "stamp-2b-reasonseg.yaml": ("runs/stamp-2b-refcoco", 1, 3e-5, "full"),
    "stamp-2b-dialogue.yaml": ("Qwen/Qwen2-VL-2B-Instruct", 2, 3e-5, "full"),
}
# the same recipes on Qwen3-VL (README, "Backbones"): 2B and 4B full, 8B LoRA as the 7B
QWEN3_RECIPES = {
    "stamp-qwen3-vl-2b-refcoco.yaml": ("Qwen/Qwen3-VL-2B-Instruct", 3, 3e-5, "full"),
    "stamp-qwen3-vl-4b-refcoco.yaml": ("Qwen/Qwen3-VL-4B-Instruct", 3, 2e-5, "full"),
    "stamp-qwen3-vl-8b-lora-refcoco.yaml": ("Qwen/Qwen3-VL-8B-Instruct", 3, 2e-5, "lora"),
}


def test_every_recipe_parses_with_its_data_rewritten_to_tiny_files(tmp_path, refer):
    recipes = {**TABLE_S1, **QWEN3_RECIPES}
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(recipes)
    assert prepare_refer(refer, tmp_path / "tiny.jsonl") == 0
    for name, (model, epochs, learning_rate, finetuning) in recipes.items():
        raw = yaml.safe_load((CONFIGS / name).read_text())
        assert raw["model"].endswith(model), name
        files = raw["data"] if isinstance(raw["data"], list) else [raw["data"]]
        assert all(f.startswith("../data/") and f.endswith(".jsonl") for f in files), name
        raw["data"] = ["tiny.jsonl"] * len(files)
        raw["output_dir"] = "out"
        raw["training"]["deepspeed"] = str(CONFIGS / raw["training"]["deepspeed"])
        (tmp_path / name).write_text(yaml.safe_dump(raw))
        config = TrainConfig.from_file(tmp_path / name)
        assert config.data == [str(tmp_path / "tiny.jsonl")] * len(files), name
        assert (config.finetuning, config.training["num_train_epochs"]) == (finetuning, epochs), name
        assert config.training["deepspeed"] == str(CONFIGS / "ds_zero2.json") and config.training["bf16"], name
        # the TrainingArguments it makes, here on CPU without DeepSpeed
        training = {k: v for k, v in config.training.items() if k not in ("deepspeed", "bf16")}
        args = dataclasses.replace(config, training=dict(training, use_cpu=True)).training_arguments()
        assert args.learning_rate == learning_rate and args.warmup_steps == 0.03, name
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 8 == 96, name  # 8 GPUs
        if finetuning == "lora":
            assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (64, 128, 0.05), name
        assert len(STAMPDataset(config.data, None)) == 3 * len(files), name


def write_raw_folders(root):
    """The raw dataset folders of the README's "Reproduce the paper", at tiny size."""
    from PIL import Image

    for name in ("refclef", "refcoco", "refcoco+"):
        write_refer(root / "refer_data" / name, image_root=root / ("saiapr_tc-12" if name == "refclef" else
                                                                   "coco/train2014"))
    write_refer(root / "refer_data" / "refcocog", image_root=root / "coco" / "train2014", split_by="umd")
    write_grefcoco(root / "refer_data" / "grefcoco", [dict(ref, split="train") for ref in GREFS],
                   image_root=root / "coco" / "train2014")
    write_reasonseg_annotation(root / "ReasonSeg" / "train", "a", (50, 30), ["the clock"], False,
                               [("target", [[0, 0], [20, 0], [20, 10], [0, 10]])])
    (root / "llava" / "coco" / "train2017").mkdir(parents=True)
    Image.new("RGB", (56, 56)).save(root / "llava" / "coco" / "train2017" / "1.jpg")
    write_llava(root / "llava" / "llava_v1_5_mix665k.json", [{"id": "1", "image": "coco/train2017/1.jpg",
                "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]}])


def test_readme_reproduce_the_paper_commands_run_on_tiny_folders(tmp_path, monkeypatch):
    import shlex

    from stamp_hf.cli import build_parser

    readme = (CONFIGS.parent / "README.md").read_text()
    section = readme.split("## Reproduce the paper")[1].split("\n## ")[0]
    commands = [shlex.split(line.split(" #")[0]) for line in re.search(r"```bash\n(.*?)```", section, re.S).group(1)
                .splitlines() if line and not line.startswith("#")]
    write_raw_folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    prepared = [c for c in commands if c[:2] == ["stamp-hf", "prepare-data"]]
    assert len(prepared) == 7
    for command in prepared:
        assert cli(command[1:]) == 0, command
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(
        ["refclef.jsonl", "refcoco.jsonl", "refcoco+.jsonl", "refcocog.jsonl", "grefcoco.jsonl", "reasonseg.jsonl",
         "llava665k.jsonl"])
    assert len(records_of(tmp_path / "data" / "refcoco.jsonl")) == 3 * 2  # train sentences x --repeats 2
    # every recipe the training commands run reads files step 1 wrote and writes the folder step 3 evaluates
    trained = [c[-1] for c in commands if "train" in c and c[-1].startswith("configs/")]
    assert sorted(Path(c).name for c in trained) == sorted(TABLE_S1)
    outputs = set()
    for config in trained:
        raw = yaml.safe_load((CONFIGS.parent / config).read_text())
        files = raw["data"] if isinstance(raw["data"], list) else [raw["data"]]
        assert all((tmp_path / "data" / Path(f).name).is_file() for f in files), config
        outputs.add(Path(raw["output_dir"]).name)
        if raw["model"].startswith("../runs/"):  # a previous stage, trained before it in the list
            assert Path(raw["model"]).name in outputs, config
    evaluations = [build_parser().parse_args(c[c.index("stamp_hf.cli") + 1:]) for c in commands if "eval" in c]
    assert len(evaluations) == 13
    for args in evaluations:
        assert Path(args.model).name in outputs and args.data.exists(), args
        assert args.images is None or args.images.is_dir()
