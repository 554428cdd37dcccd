"""Evaluation: metrics against hand-computed values, the REFER / gRefCOCO / ReasonSeg loaders on files written in
those formats, `stamp-hf eval` end to end on a trained tiny model, resuming, and the refinement hook."""

import json

import numpy as np
import pytest
from PIL import Image

from refer_data import write_grefcoco, write_reasonseg_annotation, write_refer
from shapes_data import one_thread, SHAPES, write_shapes_dataset  # noqa: F401 (fixture)
from stamp_hf.cli import main as cli
from stamp_hf.evaluation import (
    evaluate,
    intersection_union,
    load_grefcoco,
    load_reasonseg,
    load_refer,
    load_samples,
    sample_scores,
    summarize,
)
from stamp_hf.testing import tiny_stamp
from stamp_hf.training import train


# ---------------------------------------------------------------------------------------------------- metrics


def test_intersection_union_by_hand():
    prediction = np.zeros((4, 4), dtype=bool)
    target = np.zeros((4, 4), dtype=bool)
    prediction[0, :3] = True  # 3 pixels
    target[0, 1:] = True  # 3 pixels, 2 shared
    assert intersection_union(prediction, target) == (2, 4)
    ignore = np.zeros((4, 4), dtype=bool)
    ignore[0, 0] = True  # a predicted pixel in an ignore region counts for nothing
    assert intersection_union(prediction, target, ignore) == (2, 3)


def test_summary_by_hand_with_empty_targets():
    scores = [
        sample_scores(2, 4, target_empty=False, prediction_empty=False),  # IoU 0.5
        sample_scores(0, 6, target_empty=False, prediction_empty=True),  # missed: IoU 0
        sample_scores(0, 0, target_empty=True, prediction_empty=True),  # no target, none predicted: IoU 1
        sample_scores(0, 10, target_empty=True, prediction_empty=False),  # no target, 10 px predicted: IoU 0
    ]
    assert [s["iou"] for s in scores] == [0.5, 0.0, 1.0, 0.0]
    summary = summarize(scores)
    assert summary["cIoU"] == pytest.approx(100 * 2 / 20)
    assert summary["gIoU"] == pytest.approx(100 * 1.5 / 4)
    assert summary["N-acc"] == pytest.approx(50.0) and summary["T-acc"] == pytest.approx(50.0)
    assert (summary["samples"], summary["no_target_samples"]) == (4, 2)
    only_targets = summarize(scores[:2])
    assert only_targets["N-acc"] is None and only_targets["T-acc"] == 50.0


# ---------------------------------------------------------------------------------------------------- loaders


def test_refer_loader_reads_the_refer_layout_and_refuses_pickles_unless_allowed(tmp_path):
    root = write_refer(tmp_path / "refcoco", image_root=tmp_path / "train2014")
    with pytest.raises(ValueError, match=r"refs\(unc\).p is a pickle.*allow_pickle=True \(--allow-pickle\)"):
        load_refer(root, "val", image_root=tmp_path / "train2014")
    samples = load_refer(root, "val", image_root=tmp_path / "train2014", allow_pickle=True)
    assert [s.id for s in samples] == ["0_0", "0_1", "1_2"]
    assert samples[0].prompt == "Please segment only the left box in the image."
    from stamp_hf.evaluation import _sample_masks

    polygon, _ = _sample_masks(samples[0], (60, 40))
    assert polygon[11:20, 11:30].all() and polygon.sum() <= 21 * 11 and not polygon[25:].any()
    line, _ = _sample_masks(samples[2], (60, 40))
    assert line[:, 50].all() and line.sum() == 40
    # the command says so in one line
    assert cli(["eval", "--model", "m", "--data", str(root), "--output", str(tmp_path / "o")]) == 2


def test_grefcoco_loader_keeps_multi_and_no_target_references(tmp_path):
    root = write_grefcoco(tmp_path / "grefcoco")
    samples = load_samples(root, "val")  # detected as gRefCOCO
    assert [s.id for s in samples] == ["0_0", "1_1", "1_2"]
    assert len(samples[0].targets) == 2 and samples[1].targets == [] and samples[2].targets == []
    assert samples[1].image.name == "COCO_train2014_000000000002.jpg"
    assert [s.id for s in load_grefcoco(root, "testA")] == ["2_3"]


def test_reasonseg_loader_reads_target_and_ignore_polygons(tmp_path):
    write_reasonseg_annotation(tmp_path / "ReasonSeg" / "val", "a", (50, 30),
                               ["the thing used to tell time", "unused second query"], True,
                               [("target", [[0, 0], [20, 0], [20, 10], [0, 10]]),
                                ("ignore", [[30, 0], [50, 0], [50, 30], [30, 30]])])
    samples = load_reasonseg(tmp_path / "ReasonSeg", "val")
    assert len(samples) == 1 and samples[0].prompt == "the thing used to tell time Please respond with segmentation mask."
    from stamp_hf.evaluation import _sample_masks

    target, ignore = _sample_masks(samples[0], (50, 30))
    assert target[1:9, 1:19].all() and not target[15:].any()
    assert ignore[:, 31:].all() and not ignore[:, :29].any()


# ---------------------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny STAMP that learned the shapes (answers with one <|seg|> and its mask) and eval data: the four shapes
    plus a no-target query."""
    root = tmp_path_factory.mktemp("eval")
    model, processor = tiny_stamp(seed=0)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    data = write_shapes_dataset(root / "data")
    train(dict(model=str(root / "base"), data=str(data), output_dir=str(root / "model"),
               training=dict(learning_rate=3e-3, warmup_steps=0, num_train_epochs=60, per_device_train_batch_size=4,
                             save_strategy="no", use_cpu=True, logging_steps=20)))
    lines = data.read_text().splitlines()
    extra = json.loads(lines[0])
    extra["messages"][0]["content"] = "Please segment the purple star."
    extra["masks"] = [{"empty": True}]
    (root / "data" / "eval.jsonl").write_text("\n".join(lines + [json.dumps(extra)]) + "\n")
    return root / "model", root / "data" / "eval.jsonl"


def test_eval_command_scores_a_trained_model(trained, tmp_path, capsys):
    model, data = trained
    assert cli(["eval", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "out"),
                "--batch-size", "2"]) == 0
    table = capsys.readouterr().out
    assert "| STAMP | 5 |" in table
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == ["1:1", "2:1", "3:1", "4:1", "5:1"]  # record line : assistant turn
    assert all("<|seg|>" in r["response"] and r["masks"] == 1 for r in results)
    assert all(r["iou"] > 0.9 for r in results[:4])
    # the no-target query still gets a mask (the model always answers with one): it scores 0 and N-acc is 0
    assert results[4]["target_empty"] and not results[4]["prediction_empty"] and results[4]["iou"] == 0.0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["STAMP"]
    assert summary == summarize(results)
    assert summary["N-acc"] == 0.0 and summary["T-acc"] == 100.0 and summary["gIoU"] > 72
    assert (tmp_path / "out" / "summary.md").read_text().startswith("| | samples | cIoU | gIoU | N-acc | T-acc |")
    # the numbers are those of the model's own masks, recomputed here for one sample
    from transformers import AutoModel, AutoProcessor

    stamp, processor = AutoModel.from_pretrained(model), AutoProcessor.from_pretrained(model)
    size, box, *_ = SHAPES[1]
    image = Image.open(data.parent / "images" / "1.png").convert("RGB")
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": image},
                                      {"type": "text", "text": "Please segment the blue square."}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    (mask,), = processor.post_process_masks(stamp.generate_with_masks(**inputs, max_new_tokens=64), [size])
    truth = np.zeros(size, dtype=bool)
    truth[box[0]:box[2], box[1]:box[3]] = True
    assert (results[1]["intersection"], results[1]["union"]) == intersection_union(mask.numpy(), truth)


def test_eval_resumes_where_it_stopped(trained, tmp_path):
    model_path, data = trained
    from transformers import AutoModel, AutoProcessor

    model, processor = AutoModel.from_pretrained(model_path), AutoProcessor.from_pretrained(model_path)
    samples = load_samples(data)
    out = tmp_path / "out"
    evaluate(model, processor, samples[:2], out, run_info={"run": 1}, progress=False)
    # an interrupted run: a finished part file with a marked record and a torn last line
    marked = json.loads((out / "results.jsonl").read_text().splitlines()[1])
    (out / "results.jsonl").write_text((out / "results.jsonl").read_text().splitlines()[0] + "\n")
    (out / "results.part0.123.jsonl").write_text(json.dumps(dict(marked, response="FROM BEFORE")) + "\n{\"id\": \"3:1\", \"iou")
    summary = evaluate(model, processor, samples, out, run_info={"run": 1}, progress=False)
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == ["1:1", "2:1", "3:1", "4:1", "5:1"]  # each once, in order, the torn one redone
    assert results[1]["response"] == "FROM BEFORE"  # finished samples are not run again
    assert not list(out.glob("results.part*"))
    assert summary["STAMP"]["samples"] == 5
    with pytest.raises(ValueError, match=r"holds the results of another run: run differs \(1 there, 2 now\); pass --restart"):
        evaluate(model, processor, samples, out, run_info={"run": 2}, progress=False)


def test_batched_eval_gives_the_results_of_one_sample_at_a_time(trained, tmp_path):
    model_path, data = trained
    from transformers import AutoModel, AutoProcessor

    model, processor = AutoModel.from_pretrained(model_path), AutoProcessor.from_pretrained(model_path)
    samples = load_samples(data)  # images of several sizes: rows of different lengths, left-padded together
    evaluate(model, processor, samples, tmp_path / "one", progress=False)
    evaluate(model, processor, samples, tmp_path / "batched", progress=False, batch_size=3)
    one, batched = ((tmp_path / name / "results.jsonl").read_text().splitlines() for name in ("one", "batched"))
    assert len(one) == 5 and batched == one
    pad = processor.tokenizer.pad_token
    assert all(pad not in json.loads(line)["response"] for line in one)  # a shorter row's padding is not its answer


def test_refinement_hook_is_scored_alongside(trained, tmp_path):
    model_path, data = trained
    from transformers import AutoModel, AutoProcessor

    model, processor = AutoModel.from_pretrained(model_path), AutoProcessor.from_pretrained(model_path)
    samples = load_samples(data)[:2]
    calls = []

    class Everything:  # a "refinement" whose result we know: the whole image
        def refine(self, image, mask, seed=0, protocol="stamp"):
            calls.append((image.size, mask.shape, mask.dtype, seed, protocol))
            return np.ones_like(mask)

    summary = evaluate(model, processor, samples, tmp_path / "out", refiner=Everything(), progress=False)
    # the k-th mask of an answer gets seed k, as in the pipeline
    assert calls == [((112, 112), (112, 112), bool, 0, "stamp"), ((140, 84), (84, 140), bool, 0, "stamp")]
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for _, b, *_ in SHAPES[:2]]
    pixels = [h * w for (h, w), *_ in SHAPES[:2]]
    refined = summary["STAMP + refinement"]
    assert refined["cIoU"] == pytest.approx(100 * sum(areas) / sum(pixels))
    assert refined["gIoU"] == pytest.approx(100 * np.mean([a / p for a, p in zip(areas, pixels)]))
    assert summary["STAMP"]["cIoU"] > 90


def test_eval_command_scores_sam_refined_masks_alongside(trained, tmp_path, capsys):
    sam_stamp = pytest.importorskip("stamp_hf.sam_stamp")  # SAM refinement lives in stamp_hf.sam_stamp
    from stamp_hf.testing import tiny_sam

    model_path, data = trained
    sam, sam_processor = tiny_sam()
    sam.save_pretrained(tmp_path / "sam")
    sam_processor.save_pretrained(tmp_path / "sam")
    out = tmp_path / "out"
    args = ["eval", "--model", str(model_path), "--data", str(data), "--output", str(out), "--limit", "2"]
    assert cli(args + ["--refine-sam", str(tmp_path / "sam")]) == 0
    assert "| STAMP + refinement | 2 |" in capsys.readouterr().out
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # each refined score is that of the refiner applied to the model's own mask, recomputed here
    from transformers import AutoModel, AutoProcessor

    stamp, processor = AutoModel.from_pretrained(model_path), AutoProcessor.from_pretrained(model_path)
    refiner = sam_stamp.TransformersSamRefiner(sam, sam_processor)
    for sample, result in zip(load_samples(data)[:2], results):
        image = Image.open(sample.image).convert("RGB")
        inputs = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": sample.prompt}]}],
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        (mask,), = processor.post_process_masks(stamp.generate_with_masks(**inputs, max_new_tokens=64),
                                                [(image.height, image.width)])
        from stamp_hf.evaluation import _sample_masks

        target, _ = _sample_masks(sample, image.size)
        refined = refiner.refine(image, mask.numpy())
        assert (result["refined"]["intersection"], result["refined"]["union"]) == intersection_union(refined, target)
        assert result["refined"] != {k: result[k] for k in result["refined"]}  # the random SAM changed the mask


def test_eval_refine_sam_on_a_converted_checkpoint_records_the_protocol_it_used(tmp_path, capsys):
    """A converted released checkpoint prompts SAM as the official eval did, unless --sam-protocol says otherwise."""
    from test_convert import PLACEHOLDERS, official_checkpoint

    from stamp_hf import convert_checkpoint
    from stamp_hf.testing import tiny_sam

    official_checkpoint(tmp_path / "official", "current", seed=1)
    convert_checkpoint(tmp_path / "official", tmp_path / "converted", **PLACEHOLDERS)
    assert json.loads((tmp_path / "converted" / "processor_config.json").read_text())["sam_protocol"] == "official"
    from transformers import AutoModel, AutoProcessor

    from stamp_hf.testing import answer_with_masks

    converted = AutoModel.from_pretrained(tmp_path / "converted")
    answer_with_masks(converted, AutoProcessor.from_pretrained(tmp_path / "converted"))  # so that SAM has a mask
    converted.generation_config.save_pretrained(tmp_path / "converted")
    sam, sam_processor = tiny_sam()
    sam.save_pretrained(tmp_path / "sam")
    sam_processor.save_pretrained(tmp_path / "sam")
    data = write_shapes_dataset(tmp_path / "data")
    args = ["eval", "--model", str(tmp_path / "converted"), "--data", str(data), "--limit", "1",
            "--max-new-tokens", "4", "--refine-sam", str(tmp_path / "sam")]
    for extra, protocol in (([], "official"), (["--sam-protocol", "stamp"], "stamp")):
        out = tmp_path / f"out-{protocol}"
        assert cli(args + ["--output", str(out)] + extra) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["run"]["sam_protocol"] == protocol and "STAMP + refinement" in summary
        (result,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert result["masks"] == 1 and "refined" in result
    assert cli(["eval", "--model", str(tmp_path / "converted"), "--data", str(data), "--output", str(tmp_path / "x"),
                "--sam-protocol", "official"]) != 0
    assert "give --refine-sam too" in capsys.readouterr().err
