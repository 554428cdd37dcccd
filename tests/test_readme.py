"""The README's usage example is examples/quickstart.py verbatim, and it runs as written."""

import json
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_is_the_quickstart_file():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert (ROOT / "examples" / "quickstart.py").read_text() in blocks


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = "bash .ci/install && .venv/bin/python -m pytest -q"
    assert test_command in readme and test_command in ci


def warning_lines(stderr: str) -> list[str]:
    """Lines of stderr that are not progress bars (transformers' "Loading weights" / "Writing model shards")."""
    lines = re.split(r"[\r\n]+", stderr)
    return [line for line in lines if line.strip() and not re.match(r"(Loading weights|Writing model shards)", line)]


def test_quickstart_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not warning_lines(result.stderr), result.stderr
    assert "response: The red circle is <|seg|>." in result.stdout  # the demo model's real answer, labelled
    iou = float(re.search(r"IoU with the red circle: ([\d.]+)", result.stdout).group(1))
    assert iou >= 0.8, result.stdout  # a real mask of the red circle, not noise
    assert "patch grid: (13, 18) -> mask: (240, 320)" in result.stdout
    assert ("reloaded: STAMPModel from ['configuration_stamp.py', 'modeling_stamp.py', 'pipeline_stamp.py', "
            "'processing_stamp.py', 'sam_stamp.py']") in result.stdout


def test_readme_main_job_command_writes_an_overlay_with_the_bundled_demo_model(tmp_path):
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```bash\nbash \.ci/install && \.venv/bin/(stamp-hf segment [^\n]*)\n```", readme).group(1)
    args = shlex.split(command)[1:]
    assert "--model" not in args  # the bundled demo model is the default
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    script = Path(sys.executable).with_name("stamp-hf")
    result = subprocess.run([str(script), *args], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    overlay = tmp_path / "overlay.png"
    with Image.open(overlay) as image, Image.open(ROOT / "examples" / "shapes.png") as original:
        assert image.size == original.size
        with Image.open(ROOT / "docs" / "demo_overlay.png") as shown:  # the README shows what the command writes
            assert image.tobytes() == shown.tobytes()
    assert "1 mask(s)" in result.stderr
    assert [line.split()[0] for line in warning_lines(result.stderr)] == ["loaded", "answered"], result.stderr
    # the mask is the red circle's: the example image is the drawn held-out set's scene EXAMPLE_SEED
    from stamp_hf.synthetic.drawn import drawn_scene

    seed = json.loads((ROOT / "tests" / "fixtures" / "demo_floors.json").read_text())["example_seed"]
    shapes, _, masks = drawn_scene(random.Random(seed))
    (truth,) = [m for s, m in zip(shapes, masks) if (s.colour, s.kind) == ("red", "circle")]
    with Image.open(tmp_path / "mask.png") as written:
        mask = np.asarray(written) > 127
    assert (mask & truth).sum() / (mask | truth).sum() >= 0.8


# tqdm bars, any command's: with a total (a percentage), or prepare-data's count of records written
PROGRESS = re.compile(r"^((Loading weights|Writing model shards|eval)?:?\s*\d+%\||prepare-data: \d+ records \[)")


def test_the_readme_commands_print_no_warnings(tmp_path):
    """The README's command kinds as a new user runs them, console script by console script, on tiny local inputs: `init`
    on a base, `prepare-data` on a REFER export, `train` (a checkpoint every step, so Trainer's checkpoint ordering
    runs), `eval`, `chat --json --out-dir`, `segment --json`. stderr holds progress bars and each command's own lines
    only; stdout holds the command's output only (no third-party notice, e.g. DeepSpeed's, which logs on stdout)."""
    import yaml
    from shapes_data import write_shapes_refer
    from stamp_hf.testing import tiny_base

    tiny_base(tmp_path / "base")
    refer = write_shapes_refer(tmp_path / "refer")
    image = str(next((refer / "images").iterdir()))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(dict(
        model="stamp", data="train.jsonl", output_dir="run",
        training=dict(max_steps=3, per_device_train_batch_size=2, learning_rate="1e-3", save_steps=1, logging_steps=1))))
    own_lines = {  # command -> what its own stderr lines start with
        "init": (), "prepare-data": ("wrote 4 records",), "train": (), "eval": (),
        "chat": ("loaded run", "turn 1:", "turn 2:"), "segment": ("loaded run", "answered in", "the answer has no"),
    }
    commands = [
        ["init", "base", "stamp", "--min-placeholders", "4", "--max-placeholders", "64"],
        ["prepare-data", "--data", "refer", "--split", "train", "--images", "refer/images", "--allow-pickle",
         "--output", "train.jsonl"],
        ["train", "train.yaml"],
        ["eval", "--model", "run", "--data", "train.jsonl", "--output", "results"],
        ["chat", image, "--model", "run", "--json", "--out-dir", "masks", "--max-new-tokens", "8"],
        ["segment", image, "the red square", "--model", "run", "--json", "--max-new-tokens", "8"],
    ]
    script = Path(sys.executable).with_name("stamp-hf")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for command in commands:
        stdin = "Please segment the red square.\nWhat colour is it?\n" if command[0] == "chat" else None
        result = subprocess.run([str(script), *command], input=stdin, capture_output=True, text=True, cwd=tmp_path,
                                env=env, timeout=600)
        assert result.returncode == 0, (command, result.stderr[-3000:])
        noise = [line for line in warning_lines(result.stderr)
                 if not PROGRESS.match(line.strip()) and not line.startswith(own_lines[command[0]] or ("\0",))]
        assert not noise, (command, noise)
        stdout = [line for line in result.stdout.splitlines() if line.strip()]
        assert not [line for line in stdout if re.search(r"warn|deprecat", line, flags=re.I)], (command, stdout)
        if command[0] in ("chat", "segment"):  # --json: every stdout line is one JSON object
            assert [type(json.loads(line)) for line in stdout] == [dict] * (2 if command[0] == "chat" else 1), stdout
    # three checkpoints, the oldest rotated out (the package keeps save_total_limit=2): the ordering that warned ran
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
