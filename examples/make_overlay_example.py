"""Makes docs/overlay_example.png with the real `stamp-hf segment` command, from a random tiny STAMP (seed 5, told
through its generation config to answer " the circle is <|seg|>") and a generated picture. The mask is whatever
that random model predicts: this shows the CLI's output format, not segmentation quality."""

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from stamp_hf.testing import answer_with_masks, tiny_stamp

OUT = Path(__file__).resolve().parents[1] / "docs" / "overlay_example.png"

with tempfile.TemporaryDirectory() as folder:
    folder = Path(folder)
    model, processor = tiny_stamp(seed=5)
    answer_with_masks(model, processor, answer=" the circle is", segs=1)
    model.save_pretrained(folder / "stamp-tiny")
    processor.save_pretrained(folder / "stamp-tiny")
    image = Image.new("RGB", (320, 200), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 50, 140, 150), fill=(200, 30, 30))
    draw.rectangle((190, 60, 280, 150), fill=(40, 90, 200))
    image.save(folder / "shapes.png")
    command = [str(Path(sys.executable).parent / "stamp-hf"), "segment", str(folder / "shapes.png"),
               "Please segment the red circle.", "--model", str(folder / "stamp-tiny"), "--overlay", str(OUT), "--force"]
    subprocess.run(command, check=True)
