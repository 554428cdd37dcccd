"""Crash and resume: a `stamp-hf train` run killed with SIGKILL, between checkpoints or while writing one, resumes with
`resume: true` to the same weights and loss curve, bit for bit, as a run that was never interrupted."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from shapes_data import one_thread, write_shapes_dataset  # noqa: F401 (fixture)
from stamp_hf.testing import tiny_stamp
from stamp_hf.training import TrainConfig, is_complete_checkpoint, resume_checkpoint, train

# 12 steps of one sample (4 samples: 3 epochs), a checkpoint every 6: checkpoint-6 falls in the middle of an epoch,
# so resuming there skips half an epoch of batches and restores the RNG state
TRAINING = {"learning_rate": 3e-3, "warmup_steps": 0, "use_cpu": True, "logging_steps": 1, "seed": 0, "max_steps": 12,
            "per_device_train_batch_size": 1, "save_strategy": "steps", "save_steps": 6}


@pytest.fixture
def base(tmp_path):
    """A tiny STAMP checkpoint and the shapes data set on disk."""
    model, processor = tiny_stamp(seed=0)
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    return tmp_path / "base", write_shapes_dataset(tmp_path / "data")


def write_config(tmp_path, base, name, **settings) -> Path:
    checkpoint, data = base
    config = tmp_path / f"{name}.yaml"
    config.write_text(json.dumps({"model": str(checkpoint), "data": str(data), "output_dir": name,
                                  "training": TRAINING, **settings}))  # fmt: skip
    return config


def start_stamp_hf_train(config: Path, niceness=0) -> subprocess.Popen:
    """`stamp-hf train CONFIG` in its own process, on one thread, its output in CONFIG's folder as NAME.log."""
    script = Path(sys.executable).with_name("stamp-hf")
    log = (config.parent / f"{config.stem}.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([str(script), "train", str(config)], env=env, stdout=log, stderr=log,
                            preexec_fn=lambda: os.nice(niceness))  # fmt: skip


def kill_when(process: subprocess.Popen, condition, log: Path, timeout=600):
    """SIGKILL `process` as soon as `condition()` holds (polled every 2 ms)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def mark_as_logged_by_the_killed_run(checkpoint: Path):
    """Add a key to the checkpoint's first log entry: a resumed run carries it over, a run that started afresh not."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["log_history"][0]["killed_run"] = True
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


def assert_same_run(reference, resumed, tmp_path, output_dir):
    """The same loss curve (every logged figure of every step) and the same final weights, exactly."""
    def curve(trainer):
        return [{k: v for k, v in entry.items() if k != "killed_run"} for entry in trainer.state.log_history
                if "loss" in entry]  # fmt: skip

    assert [entry["step"] for entry in curve(resumed)] == list(range(1, 13))
    assert resumed.state.log_history[0].get("killed_run"), "steps 1-6 were not taken over from the checkpoint"
    assert curve(resumed) == curve(reference)
    want = load_file(tmp_path / "reference" / "model.safetensors")
    got = load_file(tmp_path / output_dir / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[key], got[key]) for key in want)


def test_a_run_killed_between_checkpoints_resumes_to_the_uninterrupted_result(base, tmp_path):
    reference = train(TrainConfig.from_file(write_config(tmp_path, base, "reference")))
    config = write_config(tmp_path, base, "killed")
    out = tmp_path / "killed"
    # at the lowest priority: the test polling its folder gets the CPU first and sees checkpoint-6 within
    # milliseconds, long before the 6 steps to checkpoint-12 are done (asserted below)
    process = start_stamp_hf_train(config, niceness=19)
    kill_when(process, lambda: is_complete_checkpoint(out / "checkpoint-6"), tmp_path / "killed.log")
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-6"]  # killed between checkpoints 6 and 12
    mark_as_logged_by_the_killed_run(out / "checkpoint-6")
    resumed = train(TrainConfig.from_file(config, ["resume=true"]))
    assert_same_run(reference, resumed, tmp_path, "killed")


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_one_before(base, tmp_path):
    """Trainer writes checkpoint-N in place, trainer_state.json last. A named pipe where checkpoint-12's optimizer.pt
    goes holds the run inside that save (writing to a pipe waits for a reader) until it is killed: the folder then
    has the weights, not the optimizer state or trainer_state.json, as a run killed there leaves it."""
    reference = train(TrainConfig.from_file(write_config(tmp_path, base, "reference")))
    config = write_config(tmp_path, base, "killed")
    out = tmp_path / "killed"
    (out / "checkpoint-12").mkdir(parents=True)
    os.mkfifo(out / "checkpoint-12" / "optimizer.pt")
    process = start_stamp_hf_train(config)
    kill_when(process, lambda: (out / "checkpoint-12" / "training_args.bin").exists(), tmp_path / "killed.log")
    (out / "checkpoint-12" / "optimizer.pt").unlink()
    (out / "checkpoint-12" / "optimizer.pt").write_bytes(b"")  # what opening it for writing leaves
    assert (out / "checkpoint-12" / "model.safetensors").is_file() and is_complete_checkpoint(out / "checkpoint-6")
    assert not is_complete_checkpoint(out / "checkpoint-12")
    assert get_last_checkpoint(out) == str(out / "checkpoint-12")  # transformers' choice: the half-written one
    mark_as_logged_by_the_killed_run(out / "checkpoint-6")
    resumed = train(TrainConfig.from_file(config, ["resume=true"]))
    assert_same_run(reference, resumed, tmp_path, "killed")
    assert is_complete_checkpoint(out / "checkpoint-12")  # written again by the resumed run


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    for step, state in ((3, '{"global_step": 3}'), (6, '{"global_step": 6, "log_hi'), (9, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-12").write_text("not a folder")
    assert resume_checkpoint(True, tmp_path) == str(tmp_path / "checkpoint-3")  # 6: cut short, 9: none yet
    assert resume_checkpoint(False, tmp_path) is None
    assert resume_checkpoint(str(tmp_path / "checkpoint-3"), tmp_path) == str(tmp_path / "checkpoint-3")
    with pytest.raises(FileNotFoundError, match=r"checkpoint-9 is not a complete checkpoint \(no readable"):
        resume_checkpoint(str(tmp_path / "checkpoint-9"), tmp_path)
    shutil.rmtree(tmp_path / "checkpoint-3")
    with pytest.raises(FileNotFoundError, match="resume: true, but .* holds no complete checkpoint to resume from"):
        resume_checkpoint(True, tmp_path)


@pytest.mark.parametrize("backbone, finetuning", [("qwen3_vl_moe", "full"), ("qwen2_vl", "lora")])
def test_resume_from_checkpoint_6_ends_where_the_run_that_went_on_ended(tmp_path, backbone, finetuning):
    """Resumed from a copy of the uninterrupted run's checkpoint-6, a run ends with its loss curve and weights (the
    text_loss and mask_loss of step 7 too: they average the steps since the resumed one). Qwen3-VL-MoE: its weights,
    saved with their own conversions, reload through from_pretrained like Qwen2-VL's legacy names. LoRA: its dropout
    (0.05) draws from the RNG state that checkpoint-6 restores, and peft reloads the adapter."""
    model, processor = tiny_stamp(seed=0, backbone=backbone)
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    base = tmp_path / "base", write_shapes_dataset(tmp_path / "data")
    reference = train(TrainConfig.from_file(write_config(tmp_path, base, "reference", finetuning=finetuning)))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "reference" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    mark_as_logged_by_the_killed_run(tmp_path / "resumed" / "checkpoint-6")
    config = write_config(tmp_path, base, "resumed", finetuning=finetuning, resume=True)
    assert_same_run(reference, train(TrainConfig.from_file(config)), tmp_path, "resumed")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_checkpoint_loads_in_place_with_legacy_names_and_a_misfit_is_named(tmp_path, tied):
    """Resuming copies a checkpoint's weights into the running model tensor by tensor (no second model): saved under
    save_pretrained's legacy Qwen2-VL names, sharded or not, every weight arrives, tied ones included; a checkpoint
    whose weight has another shape, or that lacks one, is refused with the file and the weight named."""
    from safetensors.torch import save_file

    from stamp_hf.checkpoints import CheckpointError, load_weights_in_place

    saved, _ = tiny_stamp(seed=0, tie_word_embeddings=tied)
    saved.save_pretrained(tmp_path / "one")
    saved.save_pretrained(tmp_path / "shards", max_shard_size="100KB")
    assert len(list((tmp_path / "shards").glob("model-*.safetensors"))) > 1
    weights = load_file(tmp_path / "one" / "model.safetensors")
    assert any(key.startswith("model.layers.") for key in weights)  # the legacy layout
    assert ("lm_head.weight" in weights) != tied  # a tied head is not saved: it arrives with the embeddings
    for folder in ("one", "shards"):
        model, _ = tiny_stamp(seed=1, tie_word_embeddings=tied)
        assert not torch.equal(model.classifier.weight, saved.classifier.weight)
        load_weights_in_place(model, tmp_path / folder)
        state, expected = model.state_dict(), saved.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
        assert (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tied

    (tmp_path / "bad").mkdir()
    save_file({**weights, "classifier.weight": torch.zeros(1, 7)}, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"bad/model.safetensors: classifier.weight \[1, 7\] fits no weight"):
        load_weights_in_place(tiny_stamp(seed=1, tie_word_embeddings=tied)[0], tmp_path / "bad")
    save_file({k: v for k, v in weights.items() if k != "classifier.bias"}, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"bad lacks 1 weight\(s\) of the model \(classifier.bias\)"):
        load_weights_in_place(tiny_stamp(seed=1, tie_word_embeddings=tied)[0], tmp_path / "bad")
