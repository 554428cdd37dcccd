"""`stamp-hf eval` scores what it claims (issue 27): training-format records turn by turn (each turn against its own
masks, earlier answers teacher-forced), VQA turns apart (exact match, never no-target samples), every record checked
before the model loads (file:line), resuming only the same model (weights fingerprint), data and settings, and a
failed run leaving nothing half-written. Tiny random models forced to a known answer and a known mask; no training."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_image
from test_bad_inputs import one_line_error, run_cli, snapshot  # the CLI as a user meets it, in this process
from stamp_hf.cli import main
from stamp_hf.evaluation import EvalSample, evaluate, load_samples, normalize_answer
from stamp_hf.testing import answer_with_masks, tiny_stamp

HEIGHT, WIDTH = 56, 84


def save_model(folder, segs: int, foreground: bool = True):
    """A tiny STAMP that answers " it is" + `segs` <|seg|>, each mask all foreground (or all background)."""
    model, processor = tiny_stamp(seed=1)
    answer_with_masks(model, processor, segs=segs)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(10.0 if foreground else -10.0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Models "seg" (answers with one all-foreground mask) and "vqa" (answers " it is", no mask); data.jsonl: a VQA
    record (line 1) and a two-turn record (line 2) whose first mask is the top half, the second the whole image."""
    folder = tmp_path_factory.mktemp("eval_scoring")
    save_model(folder / "seg", segs=1)
    save_model(folder / "vqa", segs=0)
    random_image(HEIGHT, WIDTH, seed=3).save(folder / "image.png")
    top = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    top[: HEIGHT // 2] = 255
    Image.fromarray(top).save(folder / "top.png")
    Image.fromarray(np.full((HEIGHT, WIDTH), 255, dtype=np.uint8)).save(folder / "full.png")
    Image.fromarray(np.full((10, 10), 255, dtype=np.uint8)).save(folder / "small.png")
    records = [
        {"image": "image.png", "messages": [{"role": "user", "content": "What is it?"},
                                            {"role": "assistant", "content": "It  is."}]},
        {"image": "image.png",
         "messages": [{"role": "user", "content": "Please segment the top half."},
                      {"role": "assistant", "content": "Sure, <|seg|>."},
                      {"role": "user", "content": "Now segment everything."},
                      {"role": "assistant", "content": "Here: <|seg|>."}],
         "masks": [{"png": "top.png"}, {"png": "full.png"}]},
    ]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def results(folder):
    return [json.loads(line) for line in (Path(folder) / "results.jsonl").read_text().splitlines()]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a model is loaded."""
    from transformers import AutoModel

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(AutoModel, "from_pretrained", refuse)


# ------------------------------------------------------------------------------------------- turn by turn, VQA apart


def test_turns_are_scored_against_their_own_masks_and_vqa_apart(workdir, monkeypatch, capsys):
    from stamp_hf.processing_stamp import STAMPProcessor

    chats = []
    real = STAMPProcessor.encode_chat

    def spy(self, messages, *args, **kwargs):
        chats.append([(m["role"], m["content"] if isinstance(m["content"], str) else m["content"][-1]["text"])
                      for m in messages])
        return real(self, messages, *args, **kwargs)

    monkeypatch.setattr(STAMPProcessor, "encode_chat", spy)
    assert run_cli(workdir, "eval", "--model", "seg", "--data", "data.jsonl", "--output", "out-seg") == 0
    table = capsys.readouterr().out
    rows = results(workdir / "out-seg")
    assert [r["id"] for r in rows] == ["1:1", "2:1", "2:2"]  # record line : assistant turn
    vqa, first, second = rows
    # the VQA turn: its answer, exact match (" it is<|seg|>" is not "It is."), no mask scores
    assert vqa["task"] == "vqa" and vqa["answer"] == "It  is." and vqa["exact_match"] is False
    assert "iou" not in vqa and "target_empty" not in vqa
    # each segmentation turn against its own mask: the all-foreground answer is half right, then exactly right
    assert first["prompt"] == "Please segment the top half." and first["iou"] == pytest.approx(0.5)
    assert second["prompt"] == "Now segment everything." and second["iou"] == 1.0
    assert (second["intersection"], second["union"]) == (HEIGHT * WIDTH, HEIGHT * WIDTH)
    # the second turn was asked with the first one's answer as the record gives it (teacher-forced)
    assert chats[-1] == [("user", "Please segment the top half."), ("assistant", "Sure, <|seg|>."),
                         ("user", "Now segment everything.")]
    summary = json.loads((workdir / "out-seg" / "summary.json").read_text())
    stamp = summary["STAMP"]
    assert (stamp["samples"], stamp["no_target_samples"], stamp["N-acc"]) == (2, 0, None)  # VQA not a no-target sample
    assert stamp["cIoU"] == pytest.approx(75.0) and stamp["gIoU"] == pytest.approx(75.0)
    assert summary["VQA"] == {"samples": 1, "exact_match": 0.0}
    assert "| STAMP | 2 |" in table and "exact match 0.00% of 1" in table

    # a model that answers the question right: exact match after normalisation (case, whitespace, final .)
    assert run_cli(workdir, "eval", "--model", "vqa", "--data", "data.jsonl", "--output", "out-vqa") == 0
    summary = json.loads((workdir / "out-vqa" / "summary.json").read_text())
    assert summary["VQA"] == {"samples": 1, "exact_match": 100.0}
    assert summary["STAMP"]["samples"] == 2 and summary["STAMP"]["T-acc"] == 0.0  # no mask: the turns are missed
    assert normalize_answer(" It  IS.\n") == normalize_answer("it is") == "it is"


def test_vqa_is_also_scored_per_kind_when_turns_carry_one(workdir, capsys):
    """An assistant message's `kind` tag (training ignores it) breaks VQA exact match down by kind; turns without one
    count under "-"; a tag that is not a string is a one-line error naming file:line."""
    records = [{"image": "image.png", "messages": [
        {"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "It is.", "kind": "what"},
        {"role": "user", "content": "How many?"}, {"role": "assistant", "content": "Two.", "kind": "count"},
        {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "it is"}]}]
    (workdir / "kinds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run_cli(workdir, "eval", "--model", "vqa", "--data", "kinds.jsonl", "--output", "out-kinds") == 0
    assert "By kind: - 100.00% of 1, count 0.00% of 1, what 100.00% of 1." in capsys.readouterr().out
    vqa = json.loads((workdir / "out-kinds" / "summary.json").read_text())["VQA"]
    assert vqa["samples"] == 3 and vqa["exact_match"] == pytest.approx(200 / 3)
    assert vqa["by_kind"] == {"-": {"samples": 1, "exact_match": 100.0}, "count": {"samples": 1, "exact_match": 0.0},
                              "what": {"samples": 1, "exact_match": 100.0}}
    assert [r.get("kind") for r in results(workdir / "out-kinds")] == ["what", "count", None]
    records[0]["messages"][1]["kind"] = 3
    (workdir / "bad_kind.jsonl").write_text(json.dumps(records[0]) + "\n")
    status = run_cli(workdir, "eval", "--model", "vqa", "--data", "bad_kind.jsonl", "--output", "out-bad")
    one_line_error(capsys, status, "bad_kind.jsonl:1: a message's 'kind' must be a string, got 3")
    assert not (workdir / "out-bad").exists()


def test_a_turn_with_several_targets_is_scored_target_by_target_besides_the_union(workdir, tmp_path, capsys):
    """A turn naming two targets (the top half, and one that is not there) answered with two all-foreground masks:
    its union scores IoU 0.5 as before; target by target, the first mask is half right and the second, a mask where
    nothing is, scores 0, so not every target is right. A model with one mask fewer misses the second target."""
    save_model(tmp_path / "two", segs=2)
    record = {"image": str(workdir / "image.png"),
              "messages": [{"role": "user", "content": "Please segment the top half and the cat."},
                           {"role": "assistant", "content": "The top half is <|seg|> and the cat is <|seg|>."}],
              "masks": [{"png": str(workdir / "top.png")}, {"empty": True}]}
    two_turns = json.loads((workdir / "data.jsonl").read_text().splitlines()[1])
    two_turns.update(image=record["image"], masks=[{"png": str(workdir / m["png"])} for m in two_turns["masks"]])
    data = tmp_path / "two.jsonl"
    data.write_text(json.dumps(record) + "\n" + json.dumps(two_turns) + "\n")
    assert run_cli(tmp_path, "eval", "--model", "two", "--data", str(data), "--output", "out") == 0
    table = capsys.readouterr().out
    several, *single = results(tmp_path / "out")
    assert several["masks"] == 2 and several["iou"] == pytest.approx(0.5)  # the union, the benchmarks' protocol
    assert several["target_ious"] == [pytest.approx(0.5), 0.0]
    assert all("target_ious" not in row for row in single)  # one <|seg|>: the union is the target
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["STAMP"]
    assert summary["several_target_samples"] == 1
    assert summary["target_mIoU"] == pytest.approx(25.0) and summary["every_target_at_0.5"] == 0.0
    assert "target by target on the 1 turns with several <|seg|>" in table and "mean IoU 25.00%" in table

    assert run_cli(tmp_path, "eval", "--model", str(workdir / "seg"), "--data", str(data), "--output", "out-one") == 0
    one_mask = results(tmp_path / "out-one")[0]
    assert one_mask["masks"] == 1 and one_mask["target_ious"] == [pytest.approx(0.5), 1.0]  # none where nothing is


# ------------------------------------------------------------------------------------------- records checked first


@pytest.mark.parametrize("bad, fragments", [
    ({"masks": [{"png": "top.png"}, {"png": "small.png"}]}, ["small.png is 10x10 but the image is 84x56"]),
    ({"image": "."}, []),  # a folder as the image
    ({"masks": [{"png": "top.png"}]}, ["2 <|seg|> in the assistant turns but 1 masks"]),
])
def test_a_bad_record_fails_before_the_model_loads_and_leaves_nothing(workdir, tmp_path, capsys, no_model_load,
                                                                      bad, fragments):
    lines = (workdir / "data.jsonl").read_text().splitlines()
    record = dict(json.loads(lines[1]), **bad)
    data = workdir / "bad.jsonl"
    data.write_text(lines[0] + "\n" + json.dumps(record) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    before = snapshot(out)
    status = run_cli(workdir, "eval", "--model", "seg", "--data", str(data), "--output", str(out), "--restart")
    one_line_error(capsys, status, f"{data}:2", *fragments)
    assert snapshot(out) == before
    status = run_cli(workdir, "eval", "--model", "seg", "--data", str(data), "--output", str(tmp_path / "new"))
    one_line_error(capsys, status, f"{data}:2")
    assert not (tmp_path / "new").exists()


def test_a_failed_run_keeps_finished_samples_and_no_partial_file(workdir, tmp_path, capsys):
    from transformers import AutoModel, AutoProcessor

    model, processor = AutoModel.from_pretrained(workdir / "seg"), AutoProcessor.from_pretrained(workdir / "seg")
    good = load_samples(workdir / "data.jsonl")[1]
    missing = EvalSample("x", workdir / "missing.png", "Please segment it.", where="data.jsonl:9 turn 1")
    with pytest.raises(FileNotFoundError, match=r"^data.jsonl:9 turn 1: .*missing.png"):
        evaluate(model, processor, [missing, good], tmp_path / "none", max_new_tokens=8)
    assert not (tmp_path / "none").exists()  # nothing finished: not even the folder it made
    assert capsys.readouterr().err.endswith("\n")  # the progress bar is closed: an error goes on its own line
    with pytest.raises(FileNotFoundError):
        evaluate(model, processor, [good, missing], tmp_path / "one", max_new_tokens=8, progress=False)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["results.jsonl", "run.json"]
    assert [r["id"] for r in results(tmp_path / "one")] == ["2:1"]  # kept for the next run to resume


# ------------------------------------------------------------------------------------------- resuming


def test_resume_checks_model_data_and_settings_before_loading(workdir, tmp_path, capsys, monkeypatch):
    save_model(tmp_path / "model", segs=1)
    for name in ("data.jsonl", "image.png", "top.png", "full.png"):
        (tmp_path / name).write_bytes((workdir / name).read_bytes())
    out = tmp_path / "out"
    args = ["eval", "--data", str(tmp_path / "data.jsonl"), "--output", str(out)]
    assert run_cli(workdir, *args, "--model", str(tmp_path / "model")) == 0
    capsys.readouterr()
    first = snapshot(out)
    # nothing changed, the model and data named another way: resumed (nothing run again, the same results)
    assert run_cli(tmp_path, "eval", "--data", "data.jsonl", "--output", "out", "--model", "./model") == 0
    assert "| STAMP | 2 |" in capsys.readouterr().out and snapshot(out) == first

    from transformers import AutoModel

    real_load = AutoModel.from_pretrained
    monkeypatch.setattr(AutoModel, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    save_model(tmp_path / "model", segs=1, foreground=False)  # retrained: same shapes, other weights
    status = run_cli(workdir, *args, "--model", str(tmp_path / "model"))
    message = one_line_error(capsys, status, "holds the results of another run: model_fingerprint differs", "--restart")
    assert "{" not in message  # the field, not the whole settings
    assert snapshot(out) == first
    status = run_cli(workdir, *args, "--model", str(tmp_path / "model"), "--max-new-tokens", "9")
    one_line_error(capsys, status, "model_fingerprint differs")  # the first difference
    save_model(tmp_path / "model", segs=1)  # the weights of the run again
    status = run_cli(workdir, *args, "--model", str(tmp_path / "model"), "--max-new-tokens", "9")
    one_line_error(capsys, status, "max_new_tokens differs (64 there, 9 now)")
    data = tmp_path / "data.jsonl"
    data.write_text(data.read_text().replace("top half", "upper half"))
    status = run_cli(workdir, *args, "--model", str(tmp_path / "model"))
    one_line_error(capsys, status, "data_fingerprint differs")
    assert snapshot(out) == first

    monkeypatch.setattr(AutoModel, "from_pretrained", real_load)
    save_model(tmp_path / "model", segs=1, foreground=False)
    assert run_cli(workdir, *args, "--model", str(tmp_path / "model"), "--restart") == 0  # started over
    assert [r["iou"] for r in results(out) if "iou" in r] == [0.0, 0.0]


def test_eval_options_have_help_with_defaults_and_a_device(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--device", "--restart", "--max-new-tokens", "--trust-remote-code", "--dtype"):
        assert option in text
    assert text.count("default") >= 16
    status = main(["eval", "--model", "m", "--data", "d.jsonl", "--output", "o", "--device", "banana"])
    one_line_error(capsys, status, "--device banana")
