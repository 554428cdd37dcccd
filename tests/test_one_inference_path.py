"""The pipeline, Conversation, evaluation, the web demo and the CLI are thin callers of one inference path
(processing_stamp's loader and message builder, generate_with_masks, the processor's post_process_generation): for the
same input, threshold and SAM seed they give the same answer, masks, scores and labels, each reaches that one
post-processing method, and an image file is decoded once per request."""

import json

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

from conftest import random_image
from stamp_hf.conversation import Conversation
from stamp_hf.evaluation import EvalSample, evaluate
from stamp_hf.sam_stamp import TransformersSamRefiner
from stamp_hf.testing import answer_with_masks, tiny_sam, tiny_stamp

PROMPT = "Please segment the cat and the dog."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one_path")
    model, processor = tiny_stamp(seed=3)
    answer_with_masks(model, processor, answer=" the cat", segs=2)  # two masks per answer, labelled "the cat" and ""
    model.config.mask_threshold = 0.05  # not the default, so a caller that ignores the config is caught
    random_image(70, 110, seed=5).save(folder / "image.png")
    return model, processor, folder, TransformersSamRefiner(*tiny_sam(seed=2))


@pytest.mark.parametrize("refine", [False, True])
def test_pipeline_conversation_and_evaluation_agree(setup, refine, tmp_path):
    model, processor, folder, sam = setup
    refiner = sam if refine else None
    image = folder / "image.png"
    result = pipeline("stamp-segmentation", model=model, processor=processor)(
        str(image), PROMPT, refine=refine, sam_model=refiner, max_new_tokens=8
    )
    assert len(result["masks"]) == 2 and [m["image"] for m in result["masks"]] == [0, 0]
    if refine:  # the SAM pass really changes the masks, so a caller that skipped it would be caught
        coarse = pipeline("stamp-segmentation", model=model, processor=processor)(str(image), PROMPT, max_new_tokens=8)
        assert not np.array_equal(np.asarray(coarse["masks"][0]["mask"]), np.asarray(result["masks"][0]["mask"]))
    chat = Conversation(model, processor, str(image), refiner=refiner).ask(PROMPT, max_new_tokens=8)
    assert chat["text"] == result["text"]
    for ours, theirs in zip(result["masks"], chat["masks"]):
        assert (ours["label"], ours["score"], ours["image"]) == (theirs["label"], theirs["score"], theirs["image"])
        assert np.array_equal(np.asarray(ours["mask"]), np.asarray(theirs["mask"]))

    # evaluation against the pipeline's own union mask as the target: identical masks score I = U = their area
    union = np.any([np.asarray(m["mask"]) > 0 for m in result["masks"]], axis=0)
    assert 0 < union.sum() < union.size
    Image.fromarray(union.astype(np.uint8) * 255).save(tmp_path / "target.png")
    sample = EvalSample(id="0", image=image, prompt=PROMPT, targets=[{"png": "target.png"}], root=tmp_path)
    summary = evaluate(model, processor, [sample], tmp_path / "eval", refiner=refiner, max_new_tokens=8, progress=False)
    (record,) = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert record["response"] == result["text"]
    assert record["labels"] == [m["label"] for m in result["masks"]]
    assert record["scores"] == [round(m["score"], 6) for m in result["masks"]]
    scored = record["refined"] if refine else record
    assert scored["intersection"] == scored["union"] == int(union.sum())
    assert summary["STAMP + refinement" if refine else "STAMP"]["cIoU"] == pytest.approx(100, abs=1e-3)
    run = json.loads((tmp_path / "eval" / "summary.json").read_text())["run"]
    assert (run["mask_threshold"], run["mask_resample"]) == (0.05, "nearest")


@pytest.fixture
def post_processing_calls(monkeypatch):
    """Every call of the one post-processing method, STAMPProcessor.post_process_generation (the real one runs)."""
    from stamp_hf.processing_stamp import STAMPProcessor

    calls = []
    real = STAMPProcessor.post_process_generation

    def spy(self, outputs, *args, **kwargs):
        calls.append(len(outputs.sequences))
        return real(self, outputs, *args, **kwargs)

    monkeypatch.setattr(STAMPProcessor, "post_process_generation", spy)
    return calls


def test_every_caller_reaches_the_one_post_processing_method(setup, post_processing_calls, tmp_path):
    """The pipeline (one call per batch), Conversation, evaluation (through the pipeline), the web demo and
    `stamp-hf segment` each reach STAMPProcessor.post_process_generation, and nothing else makes their masks."""
    model, processor, folder, _ = setup
    image = folder / "image.png"
    pipe = pipeline("stamp-segmentation", model=model, processor=processor)
    pipe([str(image)] * 3, PROMPT, batch_size=3, max_new_tokens=8)
    assert post_processing_calls == [3]
    Conversation(model, processor, str(image)).ask(PROMPT, max_new_tokens=8)
    assert post_processing_calls == [3, 1]
    sample = EvalSample(id="0", image=image, prompt=PROMPT, targets=[], root=tmp_path)
    evaluate(model, processor, [sample, EvalSample(id="1", image=image, prompt=PROMPT, targets=[], root=tmp_path)],
             tmp_path / "eval", max_new_tokens=8, progress=False, batch_size=2)
    assert post_processing_calls == [3, 1, 2]
    pytest.importorskip("gradio")
    from stamp_hf.webdemo import StampDemo

    StampDemo(model, processor, max_new_tokens=8).segment(str(image), PROMPT)
    assert post_processing_calls == [3, 1, 2, 1]


def test_an_image_is_decoded_once_per_request(setup, monkeypatch, tmp_path):
    """One pipeline call on a file and one `stamp-hf segment` run each open the image file once."""
    import PIL.Image

    from stamp_hf.cli import main

    model, processor, folder, _ = setup
    image = str(folder / "image.png")
    opened = []
    real_open = PIL.Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    pipeline("stamp-segmentation", model=model, processor=processor)(image, PROMPT, max_new_tokens=8)
    assert opened.count(image) == 1
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    opened.clear()
    code = main(["segment", image, PROMPT, "--model", str(tmp_path / "model"), "--max-new-tokens", "8",
                 "--out", str(tmp_path / "mask.png"), "--overlay", str(tmp_path / "overlay.png")])
    assert code == 0
    assert opened.count(image) == 1
