"""The README's usage example is examples/quickstart.py verbatim, and it runs as written."""

import json
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
    assert "response: Sure, it is <|seg|>." in result.stdout  # the demo model's real answer
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
