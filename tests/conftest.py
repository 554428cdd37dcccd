"""Shared fixtures: tiny STAMP models and processors built offline, images, forced continuations."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stamp_hf.testing import ForceTokens, tiny_stamp  # noqa: E402,F401


def random_image(height, width, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


def chat(processor, image=None, text="Please segment the cat.", **kwargs):
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
    )


def forced_response(model, processor, words="ok here", segs=3):
    """Token ids of a response with `segs` `<|seg|>` tokens between words, ending with <|im_end|>."""
    tokenizer = processor.tokenizer
    word_ids = tokenizer.encode(" " + words, add_special_tokens=False)
    ids = []
    for k in range(segs):
        ids += word_ids[: 1 + k % len(word_ids)] + [model.config.seg_token_id]
    return ids + word_ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]


@pytest.fixture(scope="session")
def tiny():
    model, processor = tiny_stamp(seed=0)
    return model, processor


@pytest.fixture(scope="session")
def tiny_eager():
    model, processor = tiny_stamp(seed=0, attn_implementation="eager")
    return model, processor


@pytest.fixture(scope="session")
def tiny_qwen25():
    """The Qwen2.5-VL backbone (window attention in the vision tower, its own rope index) at toy size."""
    model, processor = tiny_stamp(seed=0, backbone="qwen2_5_vl")
    return model, processor


@pytest.fixture(scope="session")
def tiny_qwen3_vl():
    """The Qwen3-VL backbone (DeepStack, interleaved M-RoPE, 32 px cells) at toy size."""
    model, processor = tiny_stamp(seed=0, backbone="qwen3_vl")
    return model, processor


# A None entry in sys.modules makes `import stamp_hf` fail and find_spec report it missing, as if never installed.
BLOCK_STAMP_HF = "import sys\nsys.modules['stamp_hf'] = None\n"


def run_isolated(code, tmp_path, extra_env=None, timeout=600):
    """Run `code` in a fresh interpreter in isolated mode (-I: no repo or user path), offline, with `stamp_hf`
    unimportable, as a user who only has transformers would. Returns its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}, **(extra_env or {}))
    script = tmp_path / "isolated_script.py"
    script.write_text(BLOCK_STAMP_HF + textwrap.dedent(code))
    result = subprocess.run(
        [sys.executable, "-I", str(script)], env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path
    )
    assert result.returncode == 0, f"isolated process failed:\n{result.stderr[-4000:]}"
    return result.stdout
