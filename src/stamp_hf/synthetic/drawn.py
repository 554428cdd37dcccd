"""The separately drawn held-out set of the demo model: shapes drawn the way a person draws them with PIL (plain
`ImageDraw` primitives in PIL's named colours on flat named backgrounds, at 320x240, 500x300, 200x400 and 640x480),
not by the generator's routine (stamp_hf.synthetic.scenes: its shades, textures, sizes and outlines). Requests are
asked in a person's words ("Please segment the red circle."), questions as the generator asks them; what a request
means (which shapes it picks out) is decided by the same `Reference` rules as the generator's.

    write_drawn_set(folder, count) -> folder/drawn.jsonl (+ drawn/images, drawn/masks)
"""

import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .scenes import FORMS, Shape, find_reference, held_out_record, question, v3_sample, write_split

DRAWN_SIZES = ((320, 240), (500, 300), (200, 400), (640, 480))
BACKGROUNDS = ("white", "whitesmoke", "lightgray", "beige", "ivory", "lavender", "honeydew", "aliceblue", "linen")
NAMED_COLOURS = {
    "red": ("red", "crimson", "firebrick"),
    "green": ("green", "forestgreen", "limegreen"),
    "blue": ("blue", "royalblue", "mediumblue"),
    "yellow": ("yellow", "gold"),
    "purple": ("purple", "darkviolet"),
    "orange": ("orange", "darkorange"),
}
KINDS = ("circle", "square", "triangle", "star", "diamond")
SIDES = {"small": (0.19, 0.25), "big": (0.34, 0.42)}  # bounding-box side, as a share of sqrt(width * height)
TASKS = {"refer": 0.5, "none": 0.15, "vqa": 0.35}
PERSON_TEMPLATES = ("Please segment the {}.", "Segment the {}.", "Can you segment the {}?", "Show me the {}.")
DRAWN_SEEDS = 7 * 10**8  # far from every split of the generator


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    """One shape filling the box (x0, y0, x1, y1) with PIL's primitives: an ellipse, a rectangle, a triangle standing
    on the box's base, a five-pointed star, a rhombus on the box's mid-points."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif kind == "star":
        r = (x1 - x0) / 2
        points = [(cx + (r if k % 2 == 0 else r * 0.5) * math.cos(-math.pi / 2 + k * math.pi / 5),
                   cy + (r if k % 2 == 0 else r * 0.5) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def drawn_scene(rng: random.Random):
    """(shapes as scenes.Shape for the reference rules, image, each shape's mask): 2 to 4 shapes apart from each
    other, fully inside the image."""
    width, height = rng.choice(DRAWN_SIZES)
    image = Image.new("RGB", (width, height), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    scale = math.sqrt(width * height)
    shapes, masks, count = [], [], rng.randint(2, 4)
    for _ in range(300):
        if len(shapes) == count:
            break
        size = rng.choice(tuple(SIDES))
        side = round(rng.uniform(*SIDES[size]) * scale)
        if side + 4 >= min(width, height):
            continue
        x0, y0 = rng.randint(2, width - side - 2), rng.randint(2, height - side - 2)
        cx, cy, radius = x0 + side // 2, y0 + side // 2, side // 2
        if any(math.hypot(cx - s.cx, cy - s.cy) < radius + s.radius + 6 for s in shapes):
            continue
        kind, colour = rng.choice(KINDS), rng.choice(tuple(NAMED_COLOURS))
        box = (x0, y0, x0 + side, y0 + side)
        draw_shape(draw, kind, box, rng.choice(NAMED_COLOURS[colour]))
        mask = Image.new("1", (width, height), 0)
        draw_shape(ImageDraw.Draw(mask), kind, box, 1)
        shapes.append(Shape(kind, colour, size, cx, cy, radius))
        masks.append(np.array(mask, dtype=bool))
    return shapes, image, masks


def write_held_out(folder, name: str, count: int, start: int, task: str | None = None) -> Path:
    """`count` v3 records of held-out set `name` ("test": the generator's test split, "drawn": the drawn set) from
    sample `start` on, into `folder`; `task`: every record of that task (a key of stamp_hf.synthetic.chats.TASKS_V3).
    What the demo model's regression tests and benchmarks/demo_floors.py score."""
    if name == "test":
        return write_split(folder, "test", count, start=start, version="v3", task=task)
    if name == "drawn":
        return write_drawn_set(folder, count, start, version="v3", task=task)
    raise ValueError(f"unknown held-out set {name!r}; expected 'test' or 'drawn'")


def write_drawn_set(folder, count: int, start: int = 0, version: str = "v2", task: str | None = None) -> Path:
    """`count` drawn scenes, one request or question each, as folder/drawn.jsonl in the held-out format of
    stamp_hf.synthetic.scenes.write_split (task, form, all_shapes). `version` "v3": each scene gets a v3
    conversation (questions of every kind, chats, multi-target requests: stamp_hf.synthetic.chats) with its turn
    tags, as the v3 test split does; `task`: every conversation of this task of TASKS_V3, v3 only. Refuses to
    overwrite an existing file."""
    if task is not None and version == "v2":
        raise ValueError("write_drawn_set: a task can be chosen for version v3 only")
    folder = Path(folder)
    jsonl = folder / "drawn.jsonl"
    if jsonl.exists():
        raise FileExistsError(f"{jsonl} already exists; choose another folder or remove it first")
    records = []
    for seed in range(DRAWN_SEEDS + start, DRAWN_SEEDS + start + count):
        rng = random.Random(seed)
        shapes, image, object_masks = drawn_scene(rng)
        if version != "v2":
            sample = v3_sample(rng, seed, shapes, image, object_masks, task, version)
            records.append(held_out_record(folder, "drawn", seed, image, sample.messages, sample.masks, object_masks,
                                           sample.task, sample.form, sample.turns, shapes))
            continue
        task = rng.choices(tuple(TASKS), weights=tuple(TASKS.values()))[0]
        found = None
        if task != "vqa":
            for form in rng.sample(FORMS, len(FORMS)):
                found = find_reference(rng, shapes, image.size, form, present=task == "refer")
                if found is not None:
                    break
        if found is None:
            task = "vqa"
        if task == "vqa":
            form, text, reply, _ = question(rng, shapes, image.size)
            masks = []
        else:
            reference, members = found
            form = reference.form
            phrase = reference.phrase(rng, article=False)
            text = f"Please segment {phrase}." if reference.many else rng.choice(PERSON_TEMPLATES).format(phrase)
            reply = "Sure, they are <|seg|>." if reference.many else "Sure, it is <|seg|>."
            masks = [np.any([object_masks[i] for i in members], axis=0) if members else None]
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        records.append(held_out_record(folder, "drawn", seed, image, messages, masks, object_masks, task, form))
    jsonl.write_text("".join(json.dumps(record) + "\n" for record in records))
    return jsonl
