"""The README's usage example is examples/quickstart.py verbatim, and it runs as written."""

import re
import subprocess
import sys
from pathlib import Path

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


def test_quickstart_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "patch grid: (6, 10) -> mask: (200, 320)" in result.stdout
    assert ("reloaded: STAMPModel from ['configuration_stamp.py', 'modeling_stamp.py', 'pipeline_stamp.py', "
            "'processing_stamp.py', 'sam_stamp.py']") in result.stdout
