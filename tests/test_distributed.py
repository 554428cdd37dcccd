"""Two CPU processes (gloo, launched with torchrun) train and evaluate exactly like one process (the reference runs
in the test process)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from shapes_data import SHAPES, one_thread, write_shapes_dataset  # noqa: F401 (fixture)
from stamp_hf.cli import main as cli
from stamp_hf.testing import tiny_stamp
from stamp_hf.training import train



def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, args, processes, succeeds=True, script=None):
    """`torchrun --nproc_per_node=N -m stamp_hf.cli ARGS`: the documented multi-process command (or `script ARGS`).
    `succeeds`: whether it must exit with 0 (else: must not)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    program = ["-m", "stamp_hf.cli"] if script is None else [str(script)]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={free_port()}", *program, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert (result.returncode == 0) == succeeds, result.stderr[-4000:]
    return result


@pytest.fixture
def base(tmp_path, request):
    model, processor = tiny_stamp(seed=0, backbone=getattr(request, "param", "qwen2_vl"))
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    # 8 samples of different lengths and sizes: a global batch of 4 mixes them differently at every step
    shapes = SHAPES + [(size, box, f"big {name}", rgb) for size, box, name, rgb in reversed(SHAPES)]
    return tmp_path / "base", write_shapes_dataset(tmp_path / "data", shapes=shapes)


@pytest.mark.parametrize("base, finetuning", [("qwen2_vl", "full"), ("qwen3_vl", "full"), ("qwen2_vl", "lora")],
                         indirect=["base"])
def test_two_processes_follow_the_loss_curve_of_one(base, finetuning, tmp_path):
    """LoRA too: its random A matrices come from the run's seed, so one process and two start from the same ones
    (without dropout, whose draws depend on how the batch is split)."""
    checkpoint, data = base
    curves = {}
    for processes, per_device in ((1, 4), (2, 2)):
        config = dict(
            model=str(checkpoint), data=str(data), output_dir=str(tmp_path / f"out{processes}"), finetuning=finetuning,
            lora=dict(dropout=0.0),
            training=dict(learning_rate=3e-3, warmup_steps=0, max_steps=6, per_device_train_batch_size=per_device,
                          logging_steps=1, save_strategy="no", use_cpu=True, seed=0),
        )
        if processes == 1:  # the reference, in this process
            train(config)
        else:
            config["training"]["ddp_backend"] = "gloo"
            (tmp_path / "train.json").write_text(json.dumps(config))
            result = launch(tmp_path, ["train", str(tmp_path / "train.json")], processes)
            assert result.stdout.count("'text_loss'") == 6  # printed by the main process only
        state = json.loads((tmp_path / f"out{processes}" / "trainer_state.json").read_text())
        curves[processes] = [entry for entry in state["log_history"] if "loss" in entry]
        assert state["train_batch_size"] == per_device
        assert state["epoch"] == 3.0  # 6 steps of a global batch of 4 over 8 samples: both processes took part
    assert len(curves[1]) == len(curves[2]) == 6
    for key in ("loss", "text_loss", "mask_loss"):
        one, two = [[entry[key] for entry in curves[p]] for p in (1, 2)]
        np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5, err_msg=key)
    assert curves[1][-1]["loss"] < curves[1][0]["loss"]  # it learned, so equal curves are not equal constants


def test_eval_under_two_processes_gives_the_summary_of_one(base, tmp_path, capsys):
    checkpoint, data = base
    train(dict(model=str(checkpoint), data=str(data), output_dir=str(tmp_path / "model"),
               training=dict(learning_rate=3e-3, warmup_steps=0, num_train_epochs=20, per_device_train_batch_size=4,
                             save_strategy="no", use_cpu=True)))
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"eval{processes}"
        args = ["eval", "--model", str(tmp_path / "model"), "--data", str(data), "--output", str(out)]
        if processes == 1:  # the reference, in this process
            assert cli(args) == 0
            stdout, stderr = capsys.readouterr()
        else:
            result = launch(tmp_path, args, processes)
            stdout, stderr = result.stdout, result.stderr
        assert stdout.count("| STAMP | 8 |") == 1  # merged and printed once, by the main process
        assert f"| {8 // processes}/{8 // processes} " in stderr  # the main process's progress bar: its share
        outputs[processes] = (json.loads((out / "summary.json").read_text()), (out / "results.jsonl").read_text())
    assert outputs[2][0] == outputs[1][0]
    assert outputs[2][1] == outputs[1][1]  # the same per-sample results, each sample once, in data order
    ids = [json.loads(line)["id"] for line in outputs[2][1].splitlines()]
    assert ids == [f"{line}:1" for line in range(1, 9)]  # record line : assistant turn, in data order
    assert not list((tmp_path / "eval2").glob("results.part*"))
