"""SAM refinement with both backends, each a tiny random SAM built from its library's own classes."""

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_image
from stamp_hf.sam_stamp import (
    SegmentAnythingRefiner,
    TransformersSamRefiner,
    load_sam_state_dict,
    mask_prompt,
    official_mask_prompt,
    official_points,
    sam_refiner,
    sample_points,
    segment_anything_model_type,
)
from stamp_hf.testing import tiny_sam, tiny_segment_anything


def coarse_mask(height, width):
    mask = np.zeros((height, width), bool)
    mask[height // 4 : height // 2, width // 5 : width // 2] = True
    return mask


@pytest.mark.parametrize("height, width", [(60, 180), (180, 60)])
def test_mask_prompt_is_sams_padded_frame(height, width):
    mask = coarse_mask(height, width)
    prompt = mask_prompt(mask)
    assert prompt.shape == (1, 1, 256, 256)
    # longest side -> 256, the other side scaled alike (no stretching), padding bottom/right is background
    content_h, content_w = round(height * 256 / max(height, width)), round(width * 256 / max(height, width))
    assert (prompt[0, 0, content_h:] < 0).all() and (prompt[0, 0, :, content_w:] < 0).all()
    rows = torch.nonzero((prompt[0, 0] > 0).any(1)).flatten()
    cols = torch.nonzero((prompt[0, 0] > 0).any(0)).flatten()
    scale = 256 / max(height, width)
    assert abs(rows.min() - height // 4 * scale) <= 1 and abs(rows.max() + 1 - height // 2 * scale) <= 1
    assert abs(cols.min() - width // 5 * scale) <= 1 and abs(cols.max() + 1 - width // 2 * scale) <= 1


def test_points_are_seeded_and_on_the_right_side():
    mask = coarse_mask(60, 180)
    points, labels = sample_points(mask, seed=4)
    again, _ = sample_points(mask, seed=4)
    other, _ = sample_points(mask, seed=5)
    assert np.array_equal(points, again) and not np.array_equal(points, other)
    assert set(labels.tolist()) == {0, 1}
    for (x, y), label in zip(points, labels):
        assert mask[int(y), int(x)] == bool(label)


@pytest.mark.parametrize("backend", ["transformers", "segment_anything"])
def test_refinement_gives_a_reproducible_mask_of_the_original_size(backend):
    refiner = TransformersSamRefiner(*tiny_sam()) if backend == "transformers" else SegmentAnythingRefiner(tiny_segment_anything())
    image = random_image(60, 180, seed=2)
    mask = coarse_mask(60, 180)
    refined = refiner.refine(image, mask, seed=1)
    assert refined.shape == (60, 180) and refined.dtype == bool
    assert np.array_equal(refined, refiner.refine(image, mask, seed=1))
    assert not np.array_equal(refined, mask)  # SAM really ran
    assert not refiner.refine(image, np.zeros((60, 180), bool)).any()  # nothing to refine stays empty


def test_both_backends_see_the_same_prompt_geometry():
    """Same weights in both libraries' SAMs would be needed for equal masks; what must agree is the prompt: the
    transformers processor maps our original-pixel points exactly as segment-anything's ResizeLongestSide does."""
    from segment_anything.utils.transforms import ResizeLongestSide

    model, processor = tiny_sam()
    image = random_image(60, 180, seed=2)
    points, labels = sample_points(coarse_mask(60, 180), seed=0)
    inputs = processor(images=image, input_points=[[points.tolist()]], input_labels=[[labels.tolist()]], return_tensors="pt")
    expected = ResizeLongestSide(1024).apply_coords(points.astype(np.float64), (60, 180))
    assert np.allclose(inputs["input_points"][0, 0].numpy(), expected, atol=1e-3)


def test_pth_checkpoints_load_weights_only(tmp_path):
    source, target = tiny_segment_anything(seed=0), tiny_segment_anything(seed=1)
    torch.save(source.state_dict(), tmp_path / "sam.pth")
    target.load_state_dict(load_sam_state_dict(tmp_path / "sam.pth"))
    for a, b in zip(source.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b)

    # anything beyond tensors and containers needs unpickling code: refused
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(model_type="vit_h")}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_sam_state_dict(tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        sam_refiner(str(tmp_path / "pickled.pth"))


@pytest.mark.parametrize("model_type", ["vit_h", "vit_l", "vit_b"])
def test_the_segment_anything_variant_is_read_from_full_size_weights(model_type):
    from segment_anything import sam_model_registry

    with torch.device("meta"):  # the real architectures, without allocating them
        state_dict = sam_model_registry[model_type]().state_dict()
    assert segment_anything_model_type(state_dict) == model_type
    state_dict["image_encoder.patch_embed.proj.weight"] = torch.empty(512, 3, 16, 16, device="meta")
    with pytest.raises(ValueError, match="unknown SAM image encoder width 512; pass model_type"):
        segment_anything_model_type(state_dict, "sam.pth")


def test_a_full_size_vit_b_pth_loads_as_a_refiner(tmp_path):
    """The smallest real SAM (94 M parameters) through sam_refiner: variant guessed, every weight loaded."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        sam = sam_model_registry["vit_b"]()
    sam = sam.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    state_dict = {k: torch.randn(v.shape, generator=generator).to(v.dtype) for k, v in sam.state_dict().items()}
    torch.save(state_dict, tmp_path / "sam_vit_b.pth")
    refiner = sam_refiner(str(tmp_path / "sam_vit_b.pth"))
    assert isinstance(refiner, SegmentAnythingRefiner)
    loaded = refiner.predictor.model.state_dict()
    assert loaded.keys() == state_dict.keys() and all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)


def test_transformers_backend_loads_a_saved_sam_folder(tmp_path):
    model, processor = tiny_sam(seed=3)
    model.save_pretrained(tmp_path / "sam")
    processor.save_pretrained(tmp_path / "sam")
    assert (tmp_path / "sam" / "model.safetensors").exists()
    loaded = sam_refiner(str(tmp_path / "sam"))
    assert isinstance(loaded, TransformersSamRefiner)
    image, mask = random_image(60, 180, seed=2), coarse_mask(60, 180)
    assert np.array_equal(loaded.refine(image, mask, seed=0), TransformersSamRefiner(model, processor).refine(image, mask, seed=0))


# ------------------------------------------------------------------ the official protocol

OFFICIAL = np.load(Path(__file__).parent / "fixtures" / "official_outputs.npz")  # make_official_outputs.py


def official_case(prefix: str, k: int) -> np.ndarray:
    height, width = (int(v) for v in OFFICIAL[f"{prefix}_size_{k}"])
    return np.unpackbits(OFFICIAL[f"{prefix}_mask_{k}"])[: height * width].reshape(height, width).astype(bool)


PROMPT_CASES = sorted(int(key.rsplit("_", 1)[1]) for key in OFFICIAL if key.startswith("prompt_size_"))
POINT_CASES = sorted(int(key.rsplit("_", 1)[1]) for key in OFFICIAL if key.startswith("points_size_"))


@pytest.mark.parametrize("case", PROMPT_CASES)
def test_official_mask_prompt_is_the_official_codes_own(case):
    """compute_logits_from_mask run from the official checkout (scaled up, down, square, 256 x 256, thin, wide,
    foreground on the padded edges): the same array, dtype and bits. PIL's bilinear filter changes between Pillow
    releases (12.3 vs 13.0: 50 of 65536 values on the thin case), so bit identity holds with the Pillow that made the
    fixture; with another one the values may move at a few resized edges only."""
    import PIL

    ours, official = official_mask_prompt(official_case("prompt", case)), OFFICIAL[f"prompt_logits_{case}"]
    assert ours.shape == (1, 256, 256) and ours.dtype == official.dtype
    if PIL.__version__ == str(OFFICIAL["versions"][2]):
        assert np.array_equal(ours, official)
    else:
        assert np.mean(ours != official) < 0.002


def restated_official_prompt(mask: np.ndarray) -> np.ndarray:
    """OFFICIAL_FACTS.md section 5 step 1, restated: 0/255 uint8, PIL bilinear to longest side 256, pad with -1 (on
    uint8), / 255, clamp to [1e-3, 1 - 1e-3], inverse sigmoid."""
    height, width = mask.shape
    scale = 256 / max(height, width)
    size = (int(width * scale + 0.5), int(height * scale + 0.5))
    image = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.BILINEAR))
    padded = np.pad(image, ((0, 256 - size[1]), (0, 256 - size[0])), mode="constant", constant_values=-1)
    levels = np.clip(padded / 255.0, 1e-3, 1 - 1e-3)
    return np.log(levels / (1 - levels))[None]


@pytest.mark.parametrize("height, width", [(60, 180), (180, 60), (480, 640), (300, 300)])
def test_official_mask_prompt_is_the_restated_steps_and_its_padding_is_foreground(height, width):
    mask = coarse_mask(height, width)
    prompt = official_mask_prompt(mask)
    assert np.array_equal(prompt, restated_official_prompt(mask))
    content_h, content_w = round(height * 256 / max(height, width)), round(width * 256 / max(height, width))
    logit = np.log((1 - 1e-3) / 1e-3)  # 6.9
    assert np.allclose(prompt[0, content_h:], logit) and np.allclose(prompt[0, :, content_w:], logit)  # the quirk
    assert np.isclose(prompt[0, 0, 0], -logit)  # background inside the image


@pytest.mark.parametrize("case", POINT_CASES)
def test_official_points_replay_the_official_draw(case):
    """masks_sample_points after torch.manual_seed(seed): (x, y) pixel indices, 10 foreground then 10 background."""
    coords, labels = official_points(official_case("points", case), seed=int(OFFICIAL[f"points_seed_{case}"]))
    assert coords.dtype == np.float64 and labels.dtype == np.uint8
    assert np.array_equal(coords, OFFICIAL[f"points_coords_{case}"])
    assert np.array_equal(labels, OFFICIAL[f"points_labels_{case}"])


def official_refinement_steps(predict, points, labels, logits):
    """eval_refer_seg.py's SAM steps, restated (OFFICIAL_FACTS.md section 5 step 3): one prediction from the points
    and the mask prompt, two more feeding SAM's low-resolution logits back, multimask_output=False, the first mask."""
    sam_mask, logit = predict(points, labels, logits)
    for _ in range(2):
        sam_mask, logit = predict(points, labels, logit)
    return sam_mask[0]


@pytest.mark.parametrize("backend", ["transformers", "segment_anything"])
def test_official_protocol_refines_as_the_official_steps(backend):
    """Points fixed (seeded), the official code's own mask prompt (from the fixture): the same refined mask."""
    mask = official_case("prompt", 0)
    image = random_image(*mask.shape, seed=2)
    points, labels = official_points(mask, seed=7)
    if backend == "segment_anything":
        from segment_anything import SamPredictor

        sam = tiny_segment_anything()
        predictor = SamPredictor(sam)
        predictor.set_image(np.array(image))

        def predict(points, labels, mask_input):
            masks, _, low_res = predictor.predict(point_coords=points, point_labels=labels, mask_input=mask_input,
                                                  multimask_output=False)
            return masks, low_res

        refiner = SegmentAnythingRefiner(sam)
    else:
        model, processor = tiny_sam()
        inputs = processor(images=image, input_points=[[points.tolist()]], input_labels=[[labels.tolist()]],
                           return_tensors="pt")
        embeddings = model.get_image_embeddings(inputs["pixel_values"])

        @torch.no_grad()
        def predict(points, labels, mask_input):
            out = model(image_embeddings=embeddings, input_points=inputs["input_points"],
                        input_labels=inputs["input_labels"], input_masks=torch.as_tensor(mask_input, dtype=torch.float).reshape(1, 1, 256, 256),
                        multimask_output=False)
            masks = processor.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
            return masks[0][0].numpy(), out.pred_masks[:, 0]

        refiner = TransformersSamRefiner(model, processor)
    expected = official_refinement_steps(predict, points, labels, OFFICIAL["prompt_logits_0"])
    refined = refiner.refine(image, mask, seed=7, protocol="official")
    assert np.array_equal(refined, expected.astype(bool))
    assert not np.array_equal(refined, refiner.refine(image, mask, seed=7, protocol="stamp"))  # the choice matters


def test_official_protocol_errors():
    refiner = SegmentAnythingRefiner(tiny_segment_anything())
    image, mask = random_image(2, 1100, seed=0), np.ones((2, 1100), bool)  # 256 * 2 / 1100 rounds to 0 px
    assert not refiner.refine(image, mask, protocol="official").any()  # the official code's except: an empty mask
    with pytest.raises(ValueError, match="SAM protocol must be one of"):
        refiner.refine(image, coarse_mask(60, 180), protocol="sam2")
