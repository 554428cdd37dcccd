"""Parity with the official STAMP procedure on resized, non-square images.

official_masks.npz (tests/fixtures/make_official_masks.py, a restatement of the official steps that imports neither
stamp_hf nor transformers) holds patch logits and the masks the official steps make from them; official_outputs.npz
(tests/fixtures/make_official_outputs.py) holds what the official code itself (HKUST-LongGroup/STAMP's
eval/eval_refer_seg.py line, run in its own environment) made. Our processor must resize to the same patch grid and,
with resample="nearest", give pixel-identical masks; "bilinear" is a different procedure and must differ."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from stamp_hf.processing_stamp import STAMPProcessor
from stamp_hf.testing import tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = np.load(FIXTURES / "official_masks.npz")
CASES = sorted(int(key.split("_")[1]) for key in FIXTURE if key.startswith("size_"))
OFFICIAL = np.load(FIXTURES / "official_outputs.npz")
OFFICIAL_CASES = sorted(int(key.split("_")[2]) for key in OFFICIAL if key.startswith("nearest_size_"))


def processor(low: int, high: int) -> STAMPProcessor:
    # Qwen2-VL's own image processing: 14 px patches merged 2 x 2, and the given placeholder bounds
    return STAMPProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tiny_tokenizer(),
                          min_placeholders=low, max_placeholders=high)


def fixture_case(case: int):
    height, width = (int(v) for v in FIXTURE[f"size_{case}"])
    logits = torch.from_numpy(FIXTURE[f"logits_{case}"])
    official = np.unpackbits(FIXTURE[f"mask_{case}"])[: len(logits) * height * width]
    return height, width, logits, official.reshape(len(logits), height, width).astype(bool)


@pytest.mark.parametrize("case", CASES)
def test_nearest_masks_are_the_official_ones_pixel_for_pixel(case):
    height, width, logits, official = fixture_case(case)
    stamp = processor(*(int(v) for v in FIXTURE[f"placeholders_{case}"]))
    grid_thw = stamp.image_processor(Image.new("RGB", (width, height)), return_tensors="pt")["image_grid_thw"][0]
    assert grid_thw.tolist() == FIXTURE[f"grid_{case}"].tolist()  # the same resize as the official code
    grids = [row.reshape(stamp.mask_grid(grid_thw)) for row in logits]  # several <|seg|> for one image in one case
    assert all(0.05 < mask.mean() < 0.95 for mask in official)  # real masks, with edges
    (nearest,) = stamp.post_process_masks([grids], [(height, width)], resample="nearest")
    assert np.array_equal(torch.stack(nearest).numpy(), official)
    (bilinear,) = stamp.post_process_masks([grids], [(height, width)], resample="bilinear")
    assert not np.array_equal(torch.stack(bilinear).numpy(), official)


def test_a_float32_nearest_would_fail():
    """The test has teeth: the same line in float32 (what grid_to_mask did before) misses the official masks on the
    cases where the float32 source index lands on another cell, among them 500x333 at the paper's 1024-1280."""
    failing = []
    for case in CASES:
        height, width, logits, official = fixture_case(case)
        grid_h, grid_w = (int(v) // 2 for v in FIXTURE[f"grid_{case}"][1:])
        cells = (logits > 0).float().view(-1, 1, grid_h, grid_w)
        float32 = F.interpolate(cells, size=(height, width), mode="nearest")[:, 0] > 0.5
        if not np.array_equal(float32.numpy(), official):
            failing.append((height, width))
    assert (333, 500) in failing and (500, 333) in failing and len(failing) >= 6


@pytest.mark.parametrize("case", OFFICIAL_CASES)
def test_nearest_masks_equal_the_official_codes_own_output(case):
    """The grids and masks the official eval line made, run in the official code's own environment."""
    height, width = (int(v) for v in OFFICIAL[f"nearest_size_{case}"])
    cells = OFFICIAL[f"nearest_grid_{case}"]
    official = np.unpackbits(OFFICIAL[f"nearest_mask_{case}"])[: height * width].reshape(height, width).astype(bool)
    # 0/1 cells as logits of +-1: post_process_masks thresholds at 0, as the official code does
    logits = torch.from_numpy(cells.astype(np.float32) * 2 - 1)
    (mask,), = processor(1024, 1280).post_process_masks([[logits]], [(height, width)], resample="nearest")
    assert np.array_equal(mask.numpy(), official)
