"""Hugging Face Space entry point: the STAMP web demo (stamp_hf.webdemo), served on the Space's host and port.

A Space runs this repository as is (see spaces/README.md for its card and spaces/requirements.txt for what it
installs): stamp_hf is imported from src/, and the `stamp-hf demo` options come from $STAMP_DEMO_ARGS, e.g.
STAMP_DEMO_ARGS="--model org/stamp-2b --refine-sam facebook/sam-vit-huge" (default: the bundled demo model)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # the repository's package, nothing installed

from stamp_hf.commands.demo import build, parse_environment  # noqa: E402
from stamp_hf.webdemo import launch  # noqa: E402

demo = build(parse_environment(os.environ.get("STAMP_DEMO_ARGS", "")))

if __name__ == "__main__":
    launch(demo)  # host and port: gradio's defaults, or the Space's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
