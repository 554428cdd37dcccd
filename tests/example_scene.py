"""What the server tests (test_webdemo.py, test_serve.py) share: examples/shapes.png, the request the bundled demo
model answers on it, its true masks (the drawn held-out set's routine: the picture is its scene EXAMPLE_SEED, which
tests/test_demo_model.py checks byte for byte), IoU, a free port of 127.0.0.1, and a command run without its extra."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from stamp_hf.synthetic.drawn import drawn_scene

ROOT = Path(__file__).resolve().parents[1]

SHAPES = ROOT / "examples" / "shapes.png"
EXAMPLE_SEED = json.loads((ROOT / "tests" / "fixtures" / "demo_floors.json").read_text())["example_seed"]
REQUEST = "Please segment the red circle."
LABEL = "The red circle is"  # the demo model's answer to REQUEST names its target before the <|seg|> (its label)
ANSWER = f"{LABEL} <|seg|>."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scene(seed=EXAMPLE_SEED):
    """(shapes, image, masks) of a drawn scene."""
    return drawn_scene(random.Random(seed))


def true_mask(seed=EXAMPLE_SEED, colour="red", kind="circle") -> np.ndarray:
    shapes, _, masks = scene(seed)
    (index,) = [k for k, s in enumerate(shapes) if (s.colour, s.kind) == (colour, kind)]
    return masks[index]


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    return float((mask & truth).sum() / (mask | truth).sum())


def without_module(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`stamp-hf ARGV` run in a fresh Python in which `module` cannot be imported (an extra not installed)."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from stamp_hf.cli import main\n"
            f"sys.exit(main({argv!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
