"""Sharded training engines, two processes launched with torchrun: each follows the loss curve of one process and
saves the plain STAMP checkpoint one process saves. The run starts from a Qwen2-VL base with tied embeddings (the 2B
layout), so the STAMP head is added and the vocabulary resized under the engine (under ZeRO-3: on sharded weights).

Here (CPU, gloo): DeepSpeed ZeRO-2 and ZeRO-3 through `stamp-hf train`. FSDP through `stamp-hf train` is refused on
CPU processes, as accelerate applies it to accelerator processes only; FSDP2 itself is checked here on the model as
accelerate shards it (tests/fsdp_worker.py). `STAMP_ENGINES_DEVICE=cuda` (benchmarks/engines_gpu.sh, two GPUs) runs
the `stamp-hf train` checks on GPUs, FSDP included."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from shapes_data import SHAPES, one_thread, write_shapes_dataset  # noqa: F401 (fixture)
from stamp_hf.data import STAMPCollator, STAMPDataset
from stamp_hf.testing import tiny_base
from stamp_hf.training import TrainConfig, load_starting_point, merge_and_save, train
from fsdp_worker import fixed_batch_steps
from test_distributed import launch

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEVICE = os.environ.get("STAMP_ENGINES_DEVICE", "cpu")
STEPS = 6
ENGINES = {
    "zero2": {"deepspeed": str(CONFIGS / "ds_zero2.json")},
    "zero3": {"deepspeed": str(CONFIGS / "ds_zero3.json")},
    "fsdp": {"fsdp": True, "fsdp_config": str(CONFIGS / "fsdp_full_shard.json")},
}


def settings(per_device, **engine):
    """float32 throughout (bf16 off on GPUs too), so two processes can match one within float noise."""
    device = {"use_cpu": True} if DEVICE == "cpu" else {"bf16": False}
    return dict(learning_rate=3e-3, warmup_steps=0, max_steps=STEPS, per_device_train_batch_size=per_device,
                logging_steps=1, save_strategy="no", seed=0, **device, **engine)


def loss_curve(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def train_on_two_processes(reference, engine, tmp_path, succeeds=True):
    folder, base, data = reference
    backend = {"ddp_backend": "gloo"} if DEVICE == "cpu" else {}
    recipe = dict(model=str(base), data=str(data), output_dir=str(tmp_path / "out"),
                  training=settings(2, **backend, **engine))
    (tmp_path / "train.json").write_text(json.dumps(recipe))
    return launch(tmp_path, ["train", str(tmp_path / "train.json")], 2, succeeds)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread):
    """A tiny Qwen2-VL base with tied embeddings, 8 samples, and the one-process run on them (global batch 4)."""
    folder = tmp_path_factory.mktemp("engines")
    base = tiny_base(folder / "base", tie=True)
    shapes = SHAPES + [(size, box, f"big {name}", rgb) for size, box, name, rgb in reversed(SHAPES)]
    data = write_shapes_dataset(folder / "data", shapes=shapes)
    train(dict(model=str(base), data=str(data), output_dir=str(folder / "one"), training=settings(4)))
    return folder, base, data


@pytest.mark.parametrize("engine", ["zero2", "zero3"] + (["fsdp"] if DEVICE != "cpu" else []))
def test_two_processes_follow_one_and_save_a_plain_checkpoint(reference, engine, tmp_path):
    if "deepspeed" in ENGINES[engine]:
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'stamp-hf[deepspeed]')")
    folder, base, data = reference
    train_on_two_processes(reference, ENGINES[engine], tmp_path)
    out = tmp_path / "out"

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["epoch"] == 3.0  # 6 steps of a global batch of 4 over 8 samples: both processes took part
    one, two = loss_curve(folder / "one"), loss_curve(out)
    assert len(one) == len(two) == STEPS
    for key in ("loss", "text_loss", "mask_loss", "grad_norm"):
        np.testing.assert_allclose([e[key] for e in two], [e[key] for e in one], rtol=1e-4, atol=1e-5, err_msg=key)
    assert one[-1]["loss"] < one[0]["loss"]  # it learned, so equal curves are not equal constants

    # the same tensors under the same names as one process saves (ZeRO-3, FSDP: gathered from the shards), float32
    saved, expected = load_file(out / "model.safetensors"), load_file(folder / "one" / "model.safetensors")
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert "lm_head.weight" not in saved  # tied to the embedding, as in the base

    # and it loads as a STAMP model whose forward is the one-process model's
    processor = AutoProcessor.from_pretrained(out)
    dataset = STAMPDataset(data, processor)
    batch = STAMPCollator(processor)([dataset[i] for i in range(len(dataset))])
    outputs = []
    for checkpoint in (out, folder / "one"):
        model = AutoModel.from_pretrained(checkpoint).eval()
        assert model.lm_head.weight is model.get_input_embeddings().weight
        with torch.no_grad():
            outputs.append(model(**batch))
    # the weights differ by float32 summation order only (measured: <= 1.5e-6 after the 6 steps), which moves
    # logits of magnitude ~10 by ~1e-5
    torch.testing.assert_close(outputs[0].logits, outputs[1].logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(outputs[0].mask_logits, outputs[1].mask_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(outputs[0].loss, outputs[1].loss, rtol=1e-5, atol=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="FSDP runs on GPUs: the test above checks it there")
def test_fsdp_on_cpu_is_refused_instead_of_running_as_ddp(reference, tmp_path):
    folder, base, data = reference
    recipe = dict(model=str(base), data=str(data), output_dir=str(tmp_path / "out"),
                  training=settings(4, **ENGINES["fsdp"]))
    with pytest.raises(ValueError, match=r"training.fsdp needs GPUs \(or another accelerator\)"):
        train(recipe)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(DEVICE != "cpu", reason="on GPUs FSDP runs through stamp-hf train itself (the test above)")
def test_fsdp2_full_shard_as_accelerate_applies_it_trains_like_one_process(reference, tmp_path):
    """FSDP2 on two CPU processes as accelerate prepares it from configs/fsdp_full_shard.json: every decoder layer and
    vision block is its own unit (the model's _no_split_modules), the tied embedding and lm_head one more, the rest
    (classifier included) the root; the losses of the same steps in one process without FSDP, and the checkpoint it
    saves."""
    folder, base, data = reference
    model, processor = load_starting_point(TrainConfig(model=str(base), data=str(data), output_dir=str(tmp_path)))
    expected_losses = fixed_batch_steps(model.train(), processor, data)
    merge_and_save(model, processor, tmp_path / "one")
    launch(tmp_path, [str(base), str(data), ENGINES["fsdp"]["fsdp_config"], str(tmp_path / "two")], 2,
           script=Path(__file__).parent / "fsdp_worker.py")
    run = json.loads((tmp_path / "two" / "fsdp_run.json").read_text())
    assert run["sharded"] == ["Embedding", "Linear", "Qwen2VLDecoderLayer", "Qwen2VLDecoderLayer",
                              "Qwen2VLVisionBlock", "Qwen2VLVisionBlock", "STAMPModel"]
    np.testing.assert_allclose(run["losses"], expected_losses, rtol=1e-4, atol=1e-5)
    assert expected_losses[-1] < expected_losses[0]

    saved, expected = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert saved.keys() == expected.keys()  # the names one process saves, lm_head tied (not saved) as in the base
    for name, tensor in expected.items():  # float32 summation order only; Adam's first steps scale tiny gradients up
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=1e-4, msg=name)
    model = AutoModel.from_pretrained(tmp_path / "two")
    assert model.lm_head.weight is model.get_input_embeddings().weight
