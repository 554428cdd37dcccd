"""Parity with the official STAMP procedure on resized, non-square images: the fixture (tests/fixtures/
make_official_masks.py, a restatement of the official steps that imports neither stamp_hf nor transformers) holds
patch logits and the masks the official code makes from them. Our processor must resize to the same patch grid and,
with resample="nearest", give pixel-identical masks; "bilinear" is a different procedure and must differ."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from stamp_hf.processing_stamp import STAMPProcessor
from stamp_hf.testing import tiny_tokenizer

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "official_masks.npz")
CASES = sorted(int(key.split("_")[1]) for key in FIXTURE if key.startswith("size_"))


@pytest.fixture(scope="module")
def processor():
    # Qwen2-VL's own image processing: 14 px patches merged 2 x 2, and the paper's 1024-1280 placeholders
    return STAMPProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tiny_tokenizer(),
                          min_placeholders=1024, max_placeholders=1280)


@pytest.mark.parametrize("case", CASES)
def test_nearest_masks_are_the_official_ones_pixel_for_pixel(processor, case):
    height, width = (int(v) for v in FIXTURE[f"size_{case}"])
    grid_thw = processor.image_processor(Image.new("RGB", (width, height)), return_tensors="pt")["image_grid_thw"][0]
    assert grid_thw.tolist() == FIXTURE[f"grid_{case}"].tolist()  # the same resize as the official code
    logits = torch.from_numpy(FIXTURE[f"logits_{case}"]).reshape(processor.mask_grid(grid_thw))
    official = np.unpackbits(FIXTURE[f"mask_{case}"])[: height * width].reshape(height, width).astype(bool)
    assert 0.05 < official.mean() < 0.95  # a real mask, with edges
    (nearest,), = processor.post_process_masks([[logits]], [(height, width)], resample="nearest")
    assert np.array_equal(nearest.numpy(), official)
    (bilinear,), = processor.post_process_masks([[logits]], [(height, width)], resample="bilinear")
    assert not np.array_equal(bilinear.numpy(), official)
