"""A seeded synthetic referring-segmentation benchmark: coloured shapes on pale backgrounds, exact masks, and
conversations (referring segmentation, multi-object and no-object targets, VQA, two-turn) in the JSONL training format.

Why: no pretrained STAMP or Qwen2-VL weights are reachable offline, so the package proves with this data that its STAMP
learns to segment from language, and trains the small demo model on it. Every sample is a pure function of one integer
seed; the train, val and test splits draw their seeds from disjoint ranges (`SPLIT_SEEDS`).
"""

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond")
# Saturated colours: each has a channel below 100, backgrounds keep every channel at 150 or above, so a shape's pixels
# can never be confused with the background's.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (230, 190, 20),
    "purple": (140, 60, 190),
    "orange": (240, 130, 20),
}
SIZES = {"small": (13, 17), "big": (23, 29)}  # circumradius range in pixels at image_size 128
SPLITS = ("train", "val", "test")
SPLIT_SEEDS = {"train": 0, "val": 10**8, "test": 2 * 10**8}  # sample i of a split uses seed SPLIT_SEEDS[split] + i
MAX_PER_SPLIT = 10**8
TASK_WEIGHTS = {"refer": 0.45, "multi": 0.1, "none": 0.1, "vqa": 0.25, "two_turn": 0.1}
NUMBERS = ("no", "one", "two", "three", "four", "five", "six")
RELATIONS = ("left of", "right of", "above", "below")  # "the shape left of the red circle", ...
MARGIN = 12  # pixels between centres for "left of", "leftmost", ... to count as unambiguous

SEGMENT_PROMPTS = ("Please segment {}.", "Segment {}.", "Can you segment {}?", "Show me {}.", "Where is {}?")
MULTI_PROMPTS = ("Please segment {}.", "Segment {}.", "Can you segment {}?", "Show me {}.")
ONE_ANSWER = "Sure, it is <|seg|>."
MANY_ANSWER = "Sure, they are <|seg|>."
NONE_ANSWER = "Sorry, there is no {} in the image. <|seg|>"


@dataclass(frozen=True)
class Shape:
    """One drawn object: its kind, colour, size class, centre and circumradius (pixels)."""

    kind: str
    colour: str
    size: str
    cx: int
    cy: int
    radius: int

    def outline(self):
        """PIL drawing call for this shape: ("ellipse" | "polygon", coordinates)."""
        cx, cy, r = self.cx, self.cy, self.radius
        if self.kind == "circle":
            return "ellipse", [cx - r, cy - r, cx + r, cy + r]
        if self.kind == "square":
            half = round(r / math.sqrt(2))
            return "polygon", [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
        if self.kind == "diamond":
            return "polygon", [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
        if self.kind == "triangle":
            corners = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
            return "polygon", [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
        if self.kind == "star":
            points = []
            for k in range(10):
                radius = r if k % 2 == 0 else r * 0.45
                angle = -math.pi / 2 + k * math.pi / 5
                points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
            return "polygon", points
        raise ValueError(f"unknown shape kind {self.kind!r}; expected one of {SHAPES}")

    def rasterize(self, size: tuple[int, int]) -> np.ndarray:
        """This shape alone as a boolean (height, width) mask, drawn without anti-aliasing."""
        canvas = Image.new("1", (size[1], size[0]), 0)
        method, coordinates = self.outline()
        getattr(ImageDraw.Draw(canvas), method)(coordinates, fill=1)
        return np.array(canvas, dtype=bool)


@dataclass
class Sample:
    """One generated image with its objects, a conversation in the training format and one mask per `<|seg|>`."""

    seed: int
    image: Image.Image
    shapes: list[Shape]
    messages: list[dict]
    masks: list[np.ndarray | None]  # None: nothing matches (an empty mask)
    task: str
    object_masks: list[np.ndarray] = field(repr=False, default_factory=list)


# ---------------------------------------------------------------------------------------------- scenes


def _background(rng: random.Random, size: int) -> np.ndarray:
    """A pale background (every channel in [150, 255]): flat, a two-colour gradient, or flat with noise."""
    pale = lambda: np.array([rng.randint(175, 250) for _ in range(3)], dtype=np.float32)  # noqa: E731
    style = rng.choice(("flat", "gradient", "noise"))
    base = np.broadcast_to(pale(), (size, size, 3)).astype(np.float32)
    if style == "gradient":
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
        ramp = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
        base = base * (1 - ramp) + pale() * ramp
    elif style == "noise":
        noise = np.random.default_rng(rng.getrandbits(32)).integers(-20, 21, size=(size, size, 3))
        base = base + noise
    return np.clip(np.rint(base), 150, 255).astype(np.uint8)


def random_scene(rng: random.Random, image_size: int = 128, min_shapes: int = 2, max_shapes: int = 4) -> list[Shape]:
    """Non-overlapping shapes (their circumcircles are apart) fully inside the image."""
    scale = image_size / 128
    count = rng.randint(min_shapes, max_shapes)
    shapes: list[Shape] = []
    for _ in range(200 * count):
        if len(shapes) == count:
            break
        size = rng.choice(tuple(SIZES))
        low, high = SIZES[size]
        radius = round(rng.randint(low, high) * scale)
        cx = rng.randint(radius + 1, image_size - radius - 2)
        cy = rng.randint(radius + 1, image_size - radius - 2)
        if all(math.hypot(cx - s.cx, cy - s.cy) > radius + s.radius + 3 for s in shapes):
            shapes.append(Shape(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), size, cx, cy, radius))
    return shapes


def render(shapes: list[Shape], background: np.ndarray) -> tuple[Image.Image, list[np.ndarray]]:
    """Paint each shape's exact mask in its colour; the masks are the painted pixels, nothing else."""
    pixels = background.copy()
    masks = []
    for shape in shapes:
        mask = shape.rasterize(pixels.shape[:2])
        pixels[mask] = COLOURS[shape.colour]
        masks.append(mask)
    return Image.fromarray(pixels), masks


def draw_scene(rng: random.Random, image_size: int = 128) -> tuple[list[Shape], Image.Image, list[np.ndarray]]:
    """A random scene on a random background: its shapes, its image and each shape's exact mask."""
    shapes = random_scene(rng, image_size)
    image, object_masks = render(shapes, _background(rng, image_size))
    return shapes, image, object_masks


# ---------------------------------------------------------------------------------------------- language


def _plural(kind: str) -> str:
    return kind + "s"


def _matching(shapes, kind=None, colour=None, size=None) -> list[int]:
    return [
        i
        for i, s in enumerate(shapes)
        if (kind is None or s.kind == kind) and (colour is None or s.colour == colour) and (size is None or s.size == size)
    ]


def _noun(kind=None, colour=None, size=None) -> str:
    return " ".join(w for w in (size, colour, kind or "shape") if w)


def _extreme(shapes, members, direction) -> int | None:
    """The member furthest in `direction`, if it leads the runner-up by MARGIN pixels."""
    key = {
        "leftmost": lambda i: shapes[i].cx,
        "rightmost": lambda i: -shapes[i].cx,
        "topmost": lambda i: shapes[i].cy,
        "bottommost": lambda i: -shapes[i].cy,
    }[direction]
    ordered = sorted(members, key=key)
    if len(ordered) >= 2 and key(ordered[1]) - key(ordered[0]) >= MARGIN:
        return ordered[0]
    return None


def _relation_members(shapes, anchor, relation) -> list[int]:
    a = shapes[anchor]
    test = {
        "left of": lambda s: s.cx <= a.cx - MARGIN,
        "right of": lambda s: s.cx >= a.cx + MARGIN,
        "above": lambda s: s.cy <= a.cy - MARGIN,
        "below": lambda s: s.cy >= a.cy + MARGIN,
    }[relation]
    return [i for i, s in enumerate(shapes) if i != anchor and test(s)]


def unique_descriptions(shapes: list[Shape], target: int, relations: bool = True) -> list[str]:
    """Every phrase (from our templates) that picks out exactly `shapes[target]`."""
    t = shapes[target]
    phrases = []
    attribute_sets = [
        dict(kind=t.kind),
        dict(colour=t.colour),
        dict(kind=t.kind, colour=t.colour),
        dict(kind=t.kind, size=t.size),
        dict(colour=t.colour, size=t.size),
        dict(kind=t.kind, colour=t.colour, size=t.size),
    ]
    for attributes in attribute_sets:
        if _matching(shapes, **attributes) == [target]:
            phrases.append("the " + _noun(**attributes))
    for attributes in (dict(), dict(kind=t.kind), dict(colour=t.colour)):
        members = _matching(shapes, **attributes)
        for direction in ("leftmost", "rightmost", "topmost", "bottommost"):
            if _extreme(shapes, members, direction) == target:
                phrases.append(f"the {direction} {_noun(**attributes)}")
    if relations:
        for anchor in range(len(shapes)):
            if anchor == target:
                continue
            anchor_names = [p for p in unique_descriptions(shapes, anchor, relations=False) if "most" not in p]
            if not anchor_names:
                continue
            for relation in RELATIONS:
                if _relation_members(shapes, anchor, relation) == [target]:
                    phrases.extend(f"the shape {relation} {name}" for name in anchor_names)
    return phrases


def phrase_kind(phrase: str) -> str:
    """What a referring phrase of `unique_descriptions` names its shape by: "relation" ("the shape left of ..."),
    "extreme" ("the leftmost ...") or "attribute" (colour / kind / size)."""
    if any(f" {relation} " in f" {phrase} " for relation in RELATIONS):
        return "relation"
    return "extreme" if "most " in phrase else "attribute"


def _absent_noun(rng, shapes) -> str:
    """A colour + kind combination that no shape in the scene has."""
    present = {(s.colour, s.kind) for s in shapes}
    options = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
    colour, kind = rng.choice(options)
    return _noun(kind=kind, colour=colour)


def _count_sentence(count: int, noun_singular: str, noun_plural: str) -> str:
    if count == 0:
        return f"There are no {noun_plural}."
    if count == 1:
        return f"There is one {noun_singular}."
    return f"There are {NUMBERS[count]} {noun_plural}."


def _group_choices(shapes) -> list[tuple[str, str, list[int]]]:
    """(singular noun, plural noun, members) for colours, kinds and sizes present in the scene."""
    groups = []
    for colour in sorted({s.colour for s in shapes}):
        groups.append((f"{colour} shape", f"{colour} shapes", _matching(shapes, colour=colour)))
    for kind in sorted({s.kind for s in shapes}):
        groups.append((kind, _plural(kind), _matching(shapes, kind=kind)))
    for size in sorted({s.size for s in shapes}):
        groups.append((f"{size} shape", f"{size} shapes", _matching(shapes, size=size)))
    return groups


def _vqa(rng, shapes) -> tuple[str, str]:
    """A question with one exact answer about the scene."""
    kind = rng.choice(("count", "count", "colour", "shape", "exists"))
    if kind == "colour" or kind == "shape":
        target = rng.randrange(len(shapes))
        names = unique_descriptions(shapes, target, relations=False)
        if kind == "shape":
            names = [n for n in names if shapes[target].kind not in n]
        if names:
            name = rng.choice(names)
            if kind == "colour":
                return f"What colour is {name}?", f"It is {shapes[target].colour}."
            return f"What shape is {name}?", f"It is a {shapes[target].kind}."
        kind = "count"
    if kind == "exists":
        if rng.random() < 0.5:
            s = rng.choice(shapes)
            return f"Is there a {s.colour} {s.kind}?", "Yes, there is."
        return f"Is there a {_absent_noun(rng, shapes)}?", "No, there is not."
    if rng.random() < 0.2:
        return "How many shapes are there?", _count_sentence(len(shapes), "shape", "shapes")
    if rng.random() < 0.3:  # a kind that may be absent, so "no" answers occur too
        noun = rng.choice(SHAPES)
        singular, plural, members = noun, _plural(noun), _matching(shapes, kind=noun)
    else:
        singular, plural, members = rng.choice(_group_choices(shapes))
    return f"How many {plural} are there?", _count_sentence(len(members), singular, plural)


def _union(masks, members, shape) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for i in members:
        out |= masks[i]
    return out


def make_sample(seed: int, image_size: int = 128, task: str | None = None) -> Sample:
    """The sample of `seed`: a scene, its exact masks and one conversation (task drawn from TASK_WEIGHTS unless given)."""
    rng = random.Random(seed)
    shapes, image, object_masks = draw_scene(rng, image_size)
    hw = (image_size, image_size)
    if task is None:
        task = rng.choices(tuple(TASK_WEIGHTS), weights=tuple(TASK_WEIGHTS.values()))[0]
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    assistant = lambda text: {"role": "assistant", "content": text}  # noqa: E731

    candidates = [(i, unique_descriptions(shapes, i)) for i in range(len(shapes))]
    candidates = [(i, names) for i, names in candidates if names]
    groups = [g for g in _group_choices(shapes) if len(g[2]) >= 2]
    if task == "multi" and not groups:
        task = "refer"
    if task in ("refer", "two_turn") and not candidates:
        task = "vqa"

    if task == "refer":
        target, names = rng.choice(candidates)
        messages = [user(rng.choice(SEGMENT_PROMPTS).format(rng.choice(names))), assistant(ONE_ANSWER)]
        masks = [object_masks[target]]
    elif task == "multi":
        _, plural, members = rng.choice(groups)
        messages = [user(rng.choice(MULTI_PROMPTS).format(f"all the {plural}")), assistant(MANY_ANSWER)]
        masks = [_union(object_masks, members, hw)]
    elif task == "none":
        noun = _absent_noun(rng, shapes)
        messages = [user(rng.choice(SEGMENT_PROMPTS).format(f"the {noun}")), assistant(NONE_ANSWER.format(noun))]
        masks = [None]
    elif task == "vqa":
        question, answer = _vqa(rng, shapes)
        messages = [user(question), assistant(answer)]
        masks = []
    elif task == "two_turn":
        if groups and rng.random() < 0.4:
            singular, plural, members = rng.choice(groups)
            first = (f"How many {plural} are there?", _count_sentence(len(members), singular, plural))
            second, answer, mask = "Please segment them.", MANY_ANSWER, _union(object_masks, members, hw)
        else:
            target, names = rng.choice(candidates)
            s = shapes[target]
            first = (f"What colour is {rng.choice(names)}?", f"It is {s.colour}.")
            second, answer, mask = "Please segment it.", ONE_ANSWER, object_masks[target]
        messages = [user(first[0]), assistant(first[1]), user(second), assistant(answer)]
        masks = [mask]
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(TASK_WEIGHTS)}")
    return Sample(seed, image, shapes, messages, masks, task, object_masks)


# ---------------------------------------------------------------------------------------------- files


def split_seeds(split: str, count: int, start: int = 0) -> range:
    """The seeds of samples start .. start+count-1 of `split`; splits never share a seed."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if start < 0 or start + count > MAX_PER_SPLIT:
        raise ValueError(f"a split holds at most {MAX_PER_SPLIT} samples, asked for {start}..{start + count - 1}")
    return range(SPLIT_SEEDS[split] + start, SPLIT_SEEDS[split] + start + count)


def write_split(folder, split: str, count: int, image_size: int = 128, start: int = 0) -> Path:
    """Write `count` samples of `split` as `folder/<split>.jsonl` plus PNG images and masks under `folder/<split>/`.

    Refuses to overwrite an existing JSONL file, so nothing generated earlier is lost."""
    folder = Path(folder)
    jsonl = folder / f"{split}.jsonl"
    if jsonl.exists():
        raise FileExistsError(f"{jsonl} already exists; choose another folder or remove it first")
    (folder / split / "images").mkdir(parents=True, exist_ok=True)
    (folder / split / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    for seed in split_seeds(split, count, start):
        sample = make_sample(seed, image_size)
        name = f"{seed:09d}"
        image_path = f"{split}/images/{name}.png"
        sample.image.save(folder / image_path)
        masks = []
        for k, mask in enumerate(sample.masks):
            if mask is None or not mask.any():
                masks.append({"empty": True})
                continue
            mask_path = f"{split}/masks/{name}_{k}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / mask_path)
            masks.append({"png": mask_path})
        record = {"image": image_path, "messages": sample.messages, "masks": masks, "task": sample.task, "seed": seed}
        lines.append(json.dumps(record))
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl


def write_dataset(folder, train: int = 4000, val: int = 200, test: int = 500, image_size: int = 128) -> dict[str, Path]:
    """Train, val and test splits (disjoint seeds) under `folder`; returns the JSONL path of each."""
    counts = {"train": train, "val": val, "test": test}
    return {split: write_split(folder, split, n, image_size) for split, n in counts.items() if n}


__all__ = [
    "COLOURS",
    "SHAPES",
    "SPLIT_SEEDS",
    "Sample",
    "Shape",
    "draw_scene",
    "make_sample",
    "phrase_kind",
    "split_seeds",
    "unique_descriptions",
    "write_dataset",
    "write_split",
]
