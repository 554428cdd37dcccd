"""`stamp-hf init` on Qwen3-VL bases laid out as the Hub repos are (2B/4B tied, 8B untied, 30B-A3B MoE): the same
checks as tests/test_init_base.py for Qwen2-VL, through its helpers, plus DeepStack on and off and the 32 px cells."""

import json

import pytest
import torch

from huggingface_hub import constants

from shapes_data import SHAPES
from stamp_hf.configuration_stamp import STAMP_TOKENS
from test_init_base import (
    TINY,
    check_clean_process_load,
    check_segments_like_the_reference,
    check_training_from_base,
    init_from_hub_cache,
)

BASES = {  # repo id -> (backbone, tied embeddings), as the Hub repos are
    "Qwen/Qwen3-VL-2B-Instruct": ("qwen3_vl", True),
    "Qwen/Qwen3-VL-8B-Instruct": ("qwen3_vl", False),
    "Qwen/Qwen3-VL-30B-A3B-Instruct": ("qwen3_vl_moe", False),
}
# the shapes of shapes_data scaled from 28 px to Qwen3-VL's 32 px cells, so the boxes stay cell-aligned
SHAPES_32 = [(tuple(v * 8 // 7 for v in size), tuple(v * 8 // 7 for v in box), name, rgb) for size, box, name, rgb in SHAPES]
COMMANDS = [["stamp-hf", "init", repo, "stamp-" + repo.split("/")[1].lower()] for repo in BASES]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return init_from_hub_cache(tmp_path_factory.mktemp("init_qwen3"), BASES, [command + TINY for command in COMMANDS])


def test_hub_layout_of_the_tiny_bases(made):
    _, bases, _ = made
    for repo, (backbone, tie) in BASES.items():
        config = json.loads((bases[repo] / "config.json").read_text())
        assert config["model_type"] == backbone and config["tie_word_embeddings"] is tie
        assert "rope_scaling" in config["text_config"] and config["text_config"]["rope_scaling"]["mrope_interleaved"]
        processor = json.loads((bases[repo] / "preprocessor_config.json").read_text())
        assert (processor["patch_size"], processor["merge_size"]) == (16, 2)
        assert (bases[repo] / "video_preprocessor_config.json").is_file()


def test_init_outputs_load_without_stamp_hf_keep_the_base_text_logits_and_run_the_pipeline(made, tmp_path):
    check_clean_process_load(made, BASES, tmp_path)


@pytest.mark.parametrize("deepstack_placeholders", [True, False])
@pytest.mark.parametrize("repo", BASES)
def test_init_output_segments_like_the_no_cache_reference(made, repo, deepstack_placeholders):
    check_segments_like_the_reference(made[2][repo], deepstack_placeholders=deepstack_placeholders)


def test_placeholder_bounds_become_32_px_cells(made):
    from transformers import AutoProcessor

    config = json.loads((made[2]["Qwen/Qwen3-VL-2B-Instruct"] / "config.json").read_text())
    assert config["deepstack_placeholders"] is True  # the default a fresh init writes, and training keeps
    assert [config[f"{name}_token_id"] for name in ("seg", "mask", "yes", "no")] == [
        config["text_config"]["vocab_size"] - len(STAMP_TOKENS) + k for k in range(4)
    ]
    processor = AutoProcessor.from_pretrained(made[2]["Qwen/Qwen3-VL-2B-Instruct"])
    size = processor.image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (4 * 32 * 32, 64 * 32 * 32)  # --min/--max-placeholders 4, 64
    from PIL import Image

    inputs = processor(images=[Image.new("RGB", (640, 480))], text=["<|vision_start|><|image_pad|><|vision_end|>"],
                       return_tensors="pt")
    assert 4 <= processor.num_placeholders(inputs["image_grid_thw"][0]) <= 64
    # 640 x 480 scaled down into 64 cells of 32 px (floored to whole cells): 288 x 192 px, 9 x 6 cells
    assert torch.equal(inputs["image_grid_thw"][0], torch.tensor([1, 12, 18]))


def test_training_from_a_qwen3_base_overfits_and_eval_reports_it(made, tmp_path, capsys, caplog, monkeypatch):
    """As test_init_base's Qwen2.5-VL run: prepare-data on a REFER export, train from the 2B-shaped base (DeepStack
    placeholders on, the default), eval: every mask IoU > 0.9."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(made[0] / "hf_home" / "hub"))
    config = {"model": "Qwen/Qwen3-VL-2B-Instruct"}
    check_training_from_base(config, "stamp_qwen3_vl", "STAMPQwen3VLModel", tmp_path, capsys, caplog, SHAPES_32)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["deepstack_placeholders"] is True


def test_the_readme_init_commands_name_bases_tested_here_or_in_test_init_base():
    from test_init_base import BASES as QWEN2_BASES
    from test_init_base import readme_init_commands

    assert {command[2] for command in readme_init_commands()} <= set(BASES) | set(QWEN2_BASES)

