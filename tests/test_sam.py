"""SAM refinement with both backends, each a tiny random SAM built from its library's own classes."""

import argparse

import numpy as np
import pytest
import torch

from conftest import random_image
from stamp_hf.sam_stamp import (
    SegmentAnythingRefiner,
    TransformersSamRefiner,
    load_sam_state_dict,
    mask_prompt,
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
