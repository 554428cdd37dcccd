"""The "stamp-segmentation" pipeline: in-process, batched, EXIF, SAM refinement, and as remote code in a fresh
process (folder and offline Hub cache) with stamp_hf unimportable."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

import stamp_hf  # noqa: F401  (registers the task)
from conftest import random_image, run_isolated
from stamp_hf.testing import answer_with_masks, put_in_hub_cache, tiny_segment_anything, tiny_stamp

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Please segment the cat."


@pytest.fixture(scope="module")
def segmenting():
    model, processor = tiny_stamp(seed=1)
    answer_with_masks(model, processor, segs=2)
    return model, processor, pipeline("stamp-segmentation", model=model, processor=processor)


def reference_masks(model, processor, image, prompt=PROMPT):
    """generate_with_masks + post_process_masks, the path the pipeline wraps."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    out = model.generate_with_masks(**inputs, max_new_tokens=16)
    return [m.numpy() for m in processor.post_process_masks(out, [(image.height, image.width)])[0]]


def as_array(mask):
    return np.asarray(mask) > 127


@pytest.mark.parametrize("height, width", [(64, 64), (50, 150), (150, 50)])
def test_masks_have_the_original_size_and_match_generate_with_masks(segmenting, height, width):
    model, processor, pipe = segmenting
    image = random_image(height, width, seed=height)
    result = pipe(image, PROMPT, max_new_tokens=16)
    assert result["text"] == " it is<|seg|><|seg|>"
    assert [m["label"] for m in result["masks"]] == ["it is", ""]
    expected = reference_masks(model, processor, image)
    assert len(result["masks"]) == len(expected) == 2
    for entry, want in zip(result["masks"], expected):
        assert entry["mask"].mode == "L" and entry["mask"].size == (width, height)
        assert np.array_equal(as_array(entry["mask"]), want)
        assert 0.0 < entry["score"] < 1.0


def test_exif_rotated_jpeg_gives_masks_at_the_upright_size(segmenting, tmp_path):
    _, _, pipe = segmenting
    stored = random_image(40, 120)  # stored 120 wide, 40 high; orientation 6 = shown rotated by 90 degrees
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif)
    for source in (str(path), Image.open(path)):
        result = pipe(source, PROMPT, max_new_tokens=16)
        assert [m["mask"].size for m in result["masks"]] == [(40, 120), (40, 120)]


def test_batched_call_equals_single_calls(segmenting):
    _, _, pipe = segmenting
    images = [random_image(64, 64, 1), random_image(50, 150, 2), random_image(150, 50, 3)]
    prompts = ["Please segment the cat.", "Segment the red circle.", "Where is the dog?"]  # different lengths
    batched = pipe(images, prompts, batch_size=3, max_new_tokens=16)
    singles = [pipe(image, prompt, max_new_tokens=16) for image, prompt in zip(images, prompts)]
    assert len(batched) == 3
    for got, want, image in zip(batched, singles, images):
        assert got["text"] == want["text"]
        assert len(got["masks"]) == len(want["masks"]) == 2
        for a, b in zip(got["masks"], want["masks"]):
            assert a["mask"].size == image.size
            assert np.array_equal(as_array(a["mask"]), as_array(b["mask"]))
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_chat_input_numpy_image_and_generate_kwargs(segmenting):
    _, _, pipe = segmenting
    image = random_image(64, 96, 4)
    chat = [{"role": "user", "content": [{"type": "image", "image": np.asarray(image)}, {"type": "text", "text": PROMPT}]}]
    result = pipe(chat, max_new_tokens=2)  # generate arguments pass through: the answer is cut after 2 tokens
    assert result["masks"] == [] and result["text"] == " it is"
    with pytest.raises(ValueError, match="no image"):
        pipe([{"role": "user", "content": "hello"}])


def test_refine_with_sam_in_the_pipeline(segmenting):
    from stamp_hf.sam_stamp import SegmentAnythingRefiner

    _, _, pipe = segmenting
    image = random_image(50, 150, 5)
    refiner = SegmentAnythingRefiner(tiny_segment_anything())
    first = pipe(image, PROMPT, max_new_tokens=16, refine=True, sam_model=refiner, seed=3)
    again = pipe(image, PROMPT, max_new_tokens=16, refine=True, sam_model=refiner, seed=3)
    coarse = pipe(image, PROMPT, max_new_tokens=16)
    for a, b, c in zip(first["masks"], again["masks"], coarse["masks"]):
        assert a["mask"].size == (150, 50)
        assert np.array_equal(as_array(a["mask"]), as_array(b["mask"]))
    assert any(not np.array_equal(as_array(a["mask"]), as_array(c["mask"])) for a, c in zip(first["masks"], coarse["masks"]))
    # the protocol: the processor's ("stamp" for this model) unless the call says otherwise
    official = pipe(image, PROMPT, max_new_tokens=16, refine=True, sam_model=refiner, seed=3, sam_protocol="official")
    for k, (a, o, c) in enumerate(zip(first["masks"], official["masks"], coarse["masks"])):
        for result, protocol in ((a, "stamp"), (o, "official")):
            expected = refiner.refine(image, as_array(c["mask"]) > 0, seed=3 + k, protocol=protocol)
            assert np.array_equal(as_array(result["mask"]) > 0, expected)


def test_pipeline_from_folder_and_hub_cache_in_a_fresh_process(segmenting, tmp_path):
    model, processor, _ = segmenting
    folder = tmp_path / "stamp-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"]["stamp-segmentation"]["impl"] == "pipeline_stamp.STAMPSegmentationPipeline"
    for name in ("pipeline_stamp.py", "sam_stamp.py"):  # byte-identical to the single source
        assert (folder / name).read_bytes() == (REPO_ROOT / name).read_bytes()

    image = random_image(50, 150, seed=7)
    image.save(tmp_path / "image.png")
    expected = reference_masks(model, processor, image)
    torch.save([torch.from_numpy(m) for m in expected], tmp_path / "expected.pt")
    put_in_hub_cache(folder, "stamp-org/stamp-tiny", tmp_path / "hf_home" / "hub")

    out = run_isolated(
        f"""
        import json, os, sys, numpy as np, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor, pipeline

        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        image = Image.open({str(tmp_path / 'image.png')!r})
        for source in ({str(folder)!r}, "stamp-org/stamp-tiny"):
            pipe = pipeline("stamp-segmentation", model=source, trust_remote_code=True)
            assert type(pipe).__module__.startswith("transformers_modules"), type(pipe).__module__
            result = pipe(image, {PROMPT!r}, max_new_tokens=16)
            assert [m["mask"].size for m in result["masks"]] == [(150, 50)] * 2, result
            for entry, want in zip(result["masks"], expected, strict=True):
                assert np.array_equal(np.asarray(entry["mask"]) > 127, want.numpy())
            print("pipeline from", source, result["text"])

        # a model loaded as remote code and saved again (a fine-tune) still carries the pipeline
        model = AutoModel.from_pretrained("stamp-org/stamp-tiny", trust_remote_code=True)
        model.save_pretrained("resaved")
        saved = sorted(f for f in os.listdir("resaved") if f.endswith(".py"))
        print("resaved", saved, json.load(open("resaved/config.json"))["custom_pipelines"]["stamp-segmentation"]["impl"])
        print("stamp_hf importable:", sys.modules.get("stamp_hf", "absent"))

        # a loaded model object: transformers reads custom_pipelines only for a name, so the task comes from the
        # registration the remote modeling code makes on import
        processor = AutoProcessor.from_pretrained("stamp-org/stamp-tiny", trust_remote_code=True)
        pipe = pipeline("stamp-segmentation", model=model, processor=processor)
        result = pipe(image, {PROMPT!r}, max_new_tokens=16)
        for entry, want in zip(result["masks"], expected, strict=True):
            assert np.array_equal(np.asarray(entry["mask"]) > 127, want.numpy())
        print("pipeline from a model object", type(pipe).__module__.split(".")[0], result["text"])
        """,
        tmp_path,
    )
    assert f"pipeline from {folder}  it is<|seg|><|seg|>" in out
    assert "pipeline from stamp-org/stamp-tiny  it is<|seg|><|seg|>" in out
    assert ("resaved ['configuration_stamp.py', 'modeling_stamp.py', 'pipeline_stamp.py', 'processing_stamp.py', "
            "'sam_stamp.py'] pipeline_stamp.STAMPSegmentationPipeline") in out
    assert (tmp_path / "resaved" / "pipeline_stamp.py").read_bytes() == (REPO_ROOT / "pipeline_stamp.py").read_bytes()
    assert "stamp_hf importable: None" in out
    assert "pipeline from a model object transformers_modules  it is<|seg|><|seg|>" in out
