"""A seeded synthetic referring-segmentation and dialogue benchmark: coloured shapes on flat or textured backgrounds at
several image sizes, exact masks, and conversations in the JSONL training format.

Why: no pretrained STAMP or Qwen2-VL weights are reachable offline, so the package proves with this data that its STAMP
learns to segment from language, and the demo model is built from it. Every sample is a pure function of one integer
seed; the train, val and test splits draw their seeds from disjoint ranges (`SPLIT_SEEDS`).

The data has no wording shortcut: a request for a shape that is not there is asked in the same forms (FORMS) and
answered with the same words as one for a shape that is, only its mask is empty; requests come in several templates,
with or without an article, in lower, upper or sentence case, with or without a full stop, and with common synonyms
("biggest" / "largest", "leftmost" / "on the left").
"""

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond")
# Several shades per colour name, the plain named colours among them; each shade keeps a channel below 110 (or, for
# yellow, blue below 110) while backgrounds keep every channel at 170 or above, so shapes never vanish.
COLOUR_SHADES = {
    "red": ((220, 40, 40), (255, 0, 0), (200, 20, 30), (235, 60, 50)),
    "green": ((40, 160, 60), (0, 128, 0), (50, 180, 50), (30, 140, 80)),
    "blue": ((40, 90, 220), (0, 0, 255), (30, 60, 200), (20, 110, 230)),
    "yellow": ((230, 190, 20), (255, 215, 0), (240, 220, 40), (220, 200, 0)),
    "purple": ((140, 60, 190), (128, 0, 128), (150, 40, 170), (110, 50, 180)),
    "orange": ((240, 130, 20), (255, 140, 0), (255, 120, 40), (230, 110, 10)),
}
COLOURS = tuple(COLOUR_SHADES)
SIZES = {"small": (13, 17), "big": (23, 29)}  # circumradius range in pixels at 128 x 128; scaled with the image's area
SIZE_WORDS = {"small": ("small", "little"), "big": ("big", "large")}
IMAGE_SIZES = ((128, 128), (160, 120), (120, 160), (192, 128), (128, 192), (200, 150), (150, 200), (224, 160),
               (160, 224), (240, 120), (120, 240), (256, 192))  # (width, height); the processor resizes them
SPLITS = ("train", "val", "test")
SPLIT_SEEDS = {"train": 0, "val": 10**8, "test": 2 * 10**8}  # sample i of a split uses seed SPLIT_SEEDS[split] + i
MAX_PER_SPLIT = 10**8
MARGIN = 0.1  # of the image's mean side: how far apart two centres must be for "left of", "leftmost", ... to hold
SIZE_LEAD = 1.25  # how much bigger than the runner-up "the biggest" must be (and the runner-up than "the smallest")

# Request forms: which attributes or geometry a request names its target by.
FORMS = ("kind", "colour", "colour+kind", "size+kind", "size+colour", "size+colour+kind", "position", "superlative",
         "relation", "all")
ATTRIBUTE_FORMS = {"kind": ("kind",), "colour": ("colour",), "colour+kind": ("colour", "kind"),
                   "size+kind": ("size", "kind"), "size+colour": ("size", "colour"),
                   "size+colour+kind": ("size", "colour", "kind")}
DIRECTIONS = {"left": ("leftmost", "on the left"), "right": ("rightmost", "on the right"),
              "top": ("topmost", "at the top"), "bottom": ("bottommost", "at the bottom")}
SUPERLATIVES = {"biggest": ("biggest", "largest"), "smallest": ("smallest",)}
RELATIONS = {"left of": ("left of", "to the left of"), "right of": ("right of", "to the right of"),
             "above": ("above",), "below": ("below", "under")}
TASK_WEIGHTS = {"refer": 0.45, "none": 0.15, "vqa": 0.3, "two_turn": 0.1}
ABSENT_SHARE = TASK_WEIGHTS["none"] / (TASK_WEIGHTS["refer"] + TASK_WEIGHTS["none"])
NUMBERS = ("no", "one", "two", "three", "four", "five", "six")

SINGLE_PROMPTS = ("Please segment {}.", "Segment {}.", "Can you segment {}?", "Show me {}.", "Find {}.",
                  "Highlight {}.", "Could you segment {} please?", "Please segment {} in the image.")
MULTI_PROMPTS = ("Please segment {}.", "Segment {}.", "Can you segment {}?", "Show me {}.", "Find {}.",
                 "Highlight {}.")
ONE_ANSWER = "Sure, it is <|seg|>."
MANY_ANSWER = "Sure, they are <|seg|>."
QUESTION_KINDS = ("count", "colour", "kind", "size", "position", "exists", "describe")


@dataclass(frozen=True)
class Shape:
    """One drawn object: its kind, colour name, size class, centre and circumradius (pixels)."""

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
    """One generated image with its objects, a conversation in the training format and one mask per `<|seg|>`
    (None: nothing matches, an empty mask). `form`: the request's form (FORMS) or the question's kind."""

    seed: int
    image: Image.Image
    shapes: list[Shape]
    messages: list[dict]
    masks: list[np.ndarray | None]
    task: str
    form: str | None = None
    object_masks: list[np.ndarray] = field(repr=False, default_factory=list)
    turns: list[dict] | None = None  # v3: one tag per assistant turn (stamp_hf.synthetic.chats)


# ---------------------------------------------------------------------------------------------- scenes


def _background(rng: random.Random, width: int, height: int) -> np.ndarray:
    """A pale background (every channel in [170, 255]): flat, a gradient, noise, stripes or checks."""
    pale = lambda: np.array([rng.randint(190, 250) for _ in range(3)], dtype=np.float32)  # noqa: E731
    style = rng.choice(("flat", "flat", "gradient", "noise", "stripes", "checks"))
    base = np.broadcast_to(pale(), (height, width, 3)).astype(np.float32)
    if style == "gradient":
        ramp = np.linspace(0.0, 1.0, width if rng.random() < 0.5 else height, dtype=np.float32)
        ramp = ramp[None, :, None] if len(ramp) == width else ramp[:, None, None]
        base = base * (1 - ramp) + pale() * ramp
    elif style == "noise":
        base = base + np.random.default_rng(rng.getrandbits(32)).integers(-15, 16, size=(height, width, 3))
    elif style in ("stripes", "checks"):
        period = rng.randint(6, 20)
        rows, cols = np.mgrid[0:height, 0:width]
        on = (cols // period) % 2 if style == "stripes" else ((rows // period) + (cols // period)) % 2
        base = base + on[..., None] * (pale() - base[0, 0]) * 0.5
    return np.clip(np.rint(base), 170, 255).astype(np.uint8)


def random_scene(rng: random.Random, width: int, height: int, min_shapes: int = 1, max_shapes: int = 5) -> list[Shape]:
    """Non-overlapping shapes (their circumcircles are apart) fully inside the image, sized with the image's area."""
    scale = math.sqrt(width * height) / 128
    count = rng.randint(min_shapes, max_shapes)
    shapes: list[Shape] = []
    for _ in range(200 * count):
        if len(shapes) == count:
            break
        size = rng.choice(tuple(SIZES))
        low, high = SIZES[size]
        radius = round(rng.randint(low, high) * scale)
        if 2 * radius + 4 >= min(width, height):
            continue
        cx = rng.randint(radius + 1, width - radius - 2)
        cy = rng.randint(radius + 1, height - radius - 2)
        if all(math.hypot(cx - s.cx, cy - s.cy) > radius + s.radius + 3 for s in shapes):
            shapes.append(Shape(rng.choice(SHAPES), rng.choice(COLOURS), size, cx, cy, radius))
    return shapes


def render(rng: random.Random, shapes: list[Shape], background: np.ndarray) -> tuple[Image.Image, list[np.ndarray]]:
    """Paint each shape's exact mask in a shade of its colour; the masks are the painted pixels, nothing else."""
    pixels = background.copy()
    masks = []
    for shape in shapes:
        mask = shape.rasterize(pixels.shape[:2])
        shade = np.array(rng.choice(COLOUR_SHADES[shape.colour])) + [rng.randint(-12, 12) for _ in range(3)]
        pixels[mask] = np.clip(shade, 0, 255)
        masks.append(mask)
    return Image.fromarray(pixels), masks


def draw_scene(rng: random.Random, size: tuple[int, int] | None = None):
    """A random scene at `size` = (width, height) (default: one of IMAGE_SIZES) on a random background: its shapes,
    its image and each shape's exact mask."""
    width, height = size if size is not None else rng.choice(IMAGE_SIZES)
    shapes = random_scene(rng, width, height)
    image, object_masks = render(rng, shapes, _background(rng, width, height))
    return shapes, image, object_masks


# ---------------------------------------------------------------------------------------------- references


def _plural(kind: str) -> str:
    return kind + "s"


@dataclass(frozen=True)
class Reference:
    """What a request names: attributes (kind, colour, size) that the members share, then optionally the extreme of
    them in a direction or by size (`extreme`), or the shapes in `relation` to the unique `anchor` shape. `many`: all
    the members ("all the circles") rather than exactly one."""

    form: str
    kind: str | None = None
    colour: str | None = None
    size: str | None = None
    extreme: str | None = None  # a key of DIRECTIONS or SUPERLATIVES
    relation: str | None = None  # a key of RELATIONS
    anchor: "Reference | None" = None
    many: bool = False

    def matching(self, shapes) -> list[int]:
        """The shapes that have every attribute named."""
        return [i for i, s in enumerate(shapes) if (self.kind is None or s.kind == self.kind)
                and (self.colour is None or s.colour == self.colour) and (self.size is None or s.size == self.size)]

    def members(self, shapes, frame: tuple[int, int]) -> list[int] | None:
        """The shapes the reference picks out ([] when none is there), or None when it is ambiguous (a singular
        reference that fits several shapes, or an extreme without a clear leader). `frame`: (width, height)."""
        margin = MARGIN * (frame[0] + frame[1]) / 2
        group = self.matching(shapes)
        if self.relation is not None:
            anchors = self.anchor.members(shapes, frame)
            if anchors is None:
                return None
            if not anchors:
                return []
            a = shapes[anchors[0]]
            test = {"left of": lambda s: s.cx <= a.cx - margin, "right of": lambda s: s.cx >= a.cx + margin,
                    "above": lambda s: s.cy <= a.cy - margin, "below": lambda s: s.cy >= a.cy + margin}[self.relation]
            group = [i for i in group if i != anchors[0] and test(shapes[i])]
        elif self.extreme is not None and len(group) >= 2:
            key, lead = {
                "left": (lambda i: shapes[i].cx, margin), "right": (lambda i: -shapes[i].cx, margin),
                "top": (lambda i: shapes[i].cy, margin), "bottom": (lambda i: -shapes[i].cy, margin),
                "biggest": (lambda i: -math.log(shapes[i].radius), math.log(SIZE_LEAD)),
                "smallest": (lambda i: math.log(shapes[i].radius), math.log(SIZE_LEAD)),
            }[self.extreme]
            ordered = sorted(group, key=key)
            return [ordered[0]] if key(ordered[1]) - key(ordered[0]) >= lead else None
        if self.many or len(group) <= 1:
            return group
        return None

    def noun(self, rng: random.Random, plural: bool = False) -> str:
        """The attribute words before the kind ("small red circle", "red shape", "shapes")."""
        size = rng.choice(SIZE_WORDS[self.size]) if self.size else None
        head = self.kind or "shape"
        return " ".join(w for w in (size, self.colour, _plural(head) if plural else head) if w)

    def phrase(self, rng: random.Random, article: bool = True) -> str:
        """The reference in words, with one of its synonyms drawn by `rng`."""
        the = "the " if article else ""
        if self.many:
            return rng.choice((f"all the {self.noun(rng, True)}", f"all {self.noun(rng, True)}",
                               f"every {self.noun(rng)}"))
        if self.relation is not None:
            return f"{the}{self.noun(rng)} {rng.choice(RELATIONS[self.relation])} {self.anchor.phrase(rng)}"
        if self.extreme in SUPERLATIVES:
            return f"{the}{rng.choice(SUPERLATIVES[self.extreme])} {self.noun(rng)}"
        if self.extreme in DIRECTIONS:
            word, place = DIRECTIONS[self.extreme]
            return f"{the}{word} {self.noun(rng)}" if rng.random() < 0.5 else f"{the}{self.noun(rng)} {place}"
        return the + self.noun(rng)


def _attribute_reference(form: str, shape: Shape) -> Reference:
    return Reference(form, **{name: getattr(shape, name) for name in ATTRIBUTE_FORMS[form]})


def _candidates(form: str, rng: random.Random) -> list[Reference]:
    """Every reference of `form` the vocabulary can say (the anchors of relations are colour + kind references)."""
    kinds, colours, sizes = (None, *SHAPES), (None, *COLOURS), tuple(SIZES)
    if form in ATTRIBUTE_FORMS:
        names = ATTRIBUTE_FORMS[form]
        options = [dict(kind=k, colour=c, size=s) for k in SHAPES for c in COLOURS for s in sizes]
        return list(dict.fromkeys(Reference(form, **{n: o[n] for n in names}) for o in options))  # in a fixed order
    if form == "position":
        return [Reference(form, kind=k, extreme=d) for k in kinds for d in DIRECTIONS] + [
            Reference(form, colour=c, extreme=d) for c in COLOURS for d in DIRECTIONS]
    if form == "superlative":
        return [Reference(form, kind=k, colour=c, extreme=e) for k in kinds for c in colours for e in SUPERLATIVES
                if k is None or c is None]
    if form == "relation":
        anchors = [Reference("colour+kind", kind=k, colour=c) for k in SHAPES for c in COLOURS]
        return [Reference(form, relation=r, anchor=rng.choice(anchors)) for r in RELATIONS for _ in range(6)]
    if form == "all":
        return [Reference(form, kind=k, colour=c, many=True) for k in kinds for c in colours if k or c] + [
            Reference(form, many=True)]
    raise ValueError(f"unknown request form {form!r}; expected one of {FORMS}")


def _relations_to(shapes) -> list[Reference]:
    """Every relation anchored on a shape of the scene by its colour and kind."""
    return [Reference("relation", relation=r, anchor=Reference("colour+kind", kind=s.kind, colour=s.colour))
            for s in shapes for r in RELATIONS]


def find_reference(rng: random.Random, shapes, frame, form: str, present: bool) -> tuple[Reference, list[int]] | None:
    """A reference of `form` that picks out at least one shape (`present`) or none, with its members; None if the
    scene has no such reference. Present singular references come from a shape's own attributes, so every shape has
    the same chance of being asked for."""
    if present and form in ATTRIBUTE_FORMS:
        options = [_attribute_reference(form, s) for s in shapes]
    elif present and form == "relation":
        options = _relations_to(shapes)
    else:
        options = _candidates(form, rng)
    rng.shuffle(options)
    for reference in options:
        members = reference.members(shapes, frame)
        if members is not None and bool(members) == present:
            return reference, members
    return None


def unique_descriptions(shapes, target: int, frame, forms=FORMS) -> list[Reference]:
    """The singular references of `forms` (relations anchored on colour + kind) that pick out exactly `target`."""
    rng = random.Random(0)
    found = []
    for form in forms:
        if form == "all":
            continue
        if form in ATTRIBUTE_FORMS:
            options = [_attribute_reference(form, shapes[target])]
        else:
            options = _relations_to(shapes) if form == "relation" else _candidates(form, rng)
        found += [r for r in dict.fromkeys(options) if r.members(shapes, frame) == [target]]
    return found


def vary(rng: random.Random, text: str) -> str:
    """The request as people type it: sometimes lower or upper case, sometimes without its final punctuation."""
    roll = rng.random()
    if roll < 0.1:
        text = text.lower()
    elif roll < 0.15:
        text = text.upper()
    if rng.random() < 0.15:
        text = text.rstrip(".?")
    return text


def request(rng: random.Random, reference: Reference) -> str:
    """A segmentation request for `reference` in one of the templates, 1 in 5 without the article."""
    phrase = reference.phrase(rng, article=rng.random() >= 0.2)
    return vary(rng, rng.choice(MULTI_PROMPTS if reference.many else SINGLE_PROMPTS).format(phrase))


# ---------------------------------------------------------------------------------------------- questions


def count_sentence(count: int, singular: str, plural: str) -> str:
    if count == 0:
        return f"There are no {plural}."
    if count == 1:
        return f"There is one {singular}."
    return f"There are {NUMBERS[count]} {plural}."


def describe_scene(shapes) -> str:
    """The scene in one sentence, shapes from left to right."""
    parts = [f"{'an' if s.size[0] in 'aeiou' else 'a'} {s.size} {s.colour} {s.kind}" for s in sorted(shapes, key=lambda s: (s.cx, s.cy))]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"There {'is' if len(shapes) == 1 else 'are'} {NUMBERS[len(shapes)]} shape{'s' * (len(shapes) > 1)}: {listed}."


def question(rng: random.Random, shapes, frame, kind: str | None = None) -> tuple[str, str, str, list[int] | None]:
    """A question with one exact answer about the scene: (kind, question, answer, shapes it is about). The asked
    attribute is never named in the question ("What colour is the red circle?" is not asked)."""
    kind = kind or rng.choice(QUESTION_KINDS)
    colour_word = rng.choice(("colour", "color"))
    if kind in ("colour", "kind", "size", "position"):
        hidden = {"colour": "colour", "kind": "kind", "size": "size", "position": None}[kind]
        forms = [f for f in ATTRIBUTE_FORMS if hidden not in ATTRIBUTE_FORMS[f]]
        target = rng.randrange(len(shapes))
        names = unique_descriptions(shapes, target, frame, forms)
        s = shapes[target]
        if kind == "position":
            names = names if abs(s.cx - frame[0] / 2) >= MARGIN * frame[0] else []
        if names:
            name = rng.choice(names).phrase(rng)
            if kind == "colour":
                return kind, f"What {colour_word} is {name}?", f"It is {s.colour}.", [target]
            if kind == "kind":
                return kind, f"What shape is {name}?", f"It is a {s.kind}.", [target]
            if kind == "size":
                return kind, f"Is {name} big or small?", f"It is {s.size}.", [target]
            side = "left" if s.cx < frame[0] / 2 else "right"
            return kind, f"Is {name} on the left or on the right?", f"It is on the {side}.", [target]
        kind = "count"
    if kind == "exists":
        present = rng.random() < 0.5
        reference = find_reference(rng, shapes, frame, rng.choice(("kind", "colour", "colour+kind")), present)
        if reference is not None:
            ref, members = reference
            noun = ref.noun(rng)
            return kind, f"Is there {'an' if noun[0] in 'aeiou' else 'a'} {noun}?", "Yes, there is." if present else "No, there is not.", members
        kind = "count"
    if kind == "describe":
        return kind, rng.choice(("Describe the image.", "What is in the image?")), describe_scene(shapes), None
    if rng.random() < 0.2:
        return "count", "How many shapes are there?", count_sentence(len(shapes), "shape", "shapes"), list(range(len(shapes)))
    ref = rng.choice([r for r in _candidates("all", rng) if r.kind is None or r.colour is None])
    members = ref.matching(shapes)
    singular, plural = ref.noun(random.Random(0)), ref.noun(random.Random(0), plural=True)
    return "count", f"How many {plural} are there?", count_sentence(len(members), singular, plural), members


# ---------------------------------------------------------------------------------------------- samples


def _union(masks, members, shape) -> np.ndarray | None:
    if not members:
        return None
    out = np.zeros(shape, dtype=bool)
    for i in members:
        out |= masks[i]
    return out


def _turn(role: str, text: str) -> dict:
    return {"role": role, "content": text}


def segmentation_request(rng: random.Random, shapes, frame, present: bool, form: str | None = None):
    """(form, request, answer, members) of a request for a present (or absent) target, the form drawn from FORMS
    among those the scene allows; None if none does."""
    forms = [form] if form else rng.sample(FORMS, len(FORMS))
    for form in forms:
        found = find_reference(rng, shapes, frame, form, present)
        if found is not None:
            reference, members = found
            return form, request(rng, reference), MANY_ANSWER if reference.many else ONE_ANSWER, members
    return None


def make_sample(seed: int, size: tuple[int, int] | None = None, task: str | None = None, version: str = "v2") -> Sample:
    """The sample of `seed`: a scene at `size` (default: drawn from IMAGE_SIZES), its exact masks and one
    conversation (task drawn from TASK_WEIGHTS unless given). `version` "v3": the conversations of
    stamp_hf.synthetic.chats (tasks TASKS_V3 there) on the same scene; "v2": the data of the demo model's first
    `stamp-hf train` stage."""
    rng = random.Random(seed)
    shapes, image, object_masks = draw_scene(rng, size)
    frame = image.size
    hw = (frame[1], frame[0])
    if version != "v2":
        return v3_sample(rng, seed, shapes, image, object_masks, task, version)
    if task is None:
        task = rng.choices(tuple(TASK_WEIGHTS), weights=tuple(TASK_WEIGHTS.values()))[0]
    if task not in TASK_WEIGHTS:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(TASK_WEIGHTS)}")
    if task in ("refer", "none"):
        form, text, reply, members = segmentation_request(rng, shapes, frame, present=task == "refer")
        messages, masks = [_turn("user", text), _turn("assistant", reply)], [_union(object_masks, members, hw)]
    elif task == "vqa":
        form, text, reply, _ = question(rng, shapes, frame)
        messages, masks = [_turn("user", text), _turn("assistant", reply)], []
    else:  # two_turn: a question about some shapes, then "segment it / them"
        form, text, reply, members = question(rng, shapes, frame, rng.choice(("colour", "kind", "count")))
        many = form == "count"
        follow = rng.choice(("Please segment them.", "Segment them.")) if many else rng.choice(
            ("Please segment it.", "Segment it.", "Show it to me."))
        messages = [_turn("user", text), _turn("assistant", reply), _turn("user", follow),
                    _turn("assistant", MANY_ANSWER if many else ONE_ANSWER)]
        masks = [_union(object_masks, members, hw)]
    return Sample(seed, image, shapes, messages, masks, task, form, object_masks)


def v3_sample(rng: random.Random, seed: int, shapes, image, object_masks, task: str | None, version: str = "v3"):
    """The v3 Sample of a drawn scene: a conversation of stamp_hf.synthetic.chats, its task drawn from TASKS_V3
    unless given, each `<|seg|>`'s mask the union of its members (None: nothing there)."""
    from .chats import TASKS_V3, VERSIONS, conversation

    if version not in VERSIONS:
        raise ValueError(f"unknown data version {version!r}; expected one of {VERSIONS}")
    if task is None:
        task = rng.choices(tuple(TASKS_V3), weights=tuple(TASKS_V3.values()))[0]
    messages, members_of, turns, task, form = conversation(rng, shapes, image.size, task)
    hw = (image.size[1], image.size[0])
    masks = [_union(object_masks, members, hw) for members in members_of]
    return Sample(seed, image, shapes, messages, masks, task, form, object_masks, turns)


# ---------------------------------------------------------------------------------------------- files


def split_seeds(split: str, count: int, start: int = 0) -> range:
    """The seeds of samples start .. start+count-1 of `split`; splits never share a seed."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if start < 0 or start + count > MAX_PER_SPLIT:
        raise ValueError(f"a split holds at most {MAX_PER_SPLIT} samples, asked for {start}..{start + count - 1}")
    return range(SPLIT_SEEDS[split] + start, SPLIT_SEEDS[split] + start + count)


def _check_new(path: Path) -> None:
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose another folder or remove it first")


def write_split(folder, split: str, count: int, start: int = 0, tasks=None, version: str = "v2",
                task: str | None = None) -> Path:
    """Write `count` samples of `split` as `folder/<split>.jsonl` plus PNG images and masks under `folder/<split>/`.
    `tasks`: the tasks to keep (others are skipped, so fewer records may come); `task`: every sample of this task
    (as make_sample's; a scene that allows none gets a question). Records carry the task, the request
    form, the seed and a mask of all the shapes (`all_shapes`, for the language-blind baseline); `version` "v3"
    records also a tag per assistant turn (`turns`) and the scene's shapes. Refuses to overwrite an existing JSONL
    file, so nothing generated earlier is lost."""
    folder = Path(folder)
    jsonl = folder / f"{split}.jsonl"
    _check_new(jsonl)
    records = []
    for seed in split_seeds(split, count, start):
        sample = make_sample(seed, task=task, version=version)
        if tasks is None or sample.task in tasks:
            records.append(held_out_record(folder, split, seed, sample.image, sample.messages, sample.masks,
                                           sample.object_masks, sample.task, sample.form, sample.turns, sample.shapes))
    jsonl.write_text("".join(json.dumps(record) + "\n" for record in records))
    return jsonl


def held_out_record(folder, split: str, seed: int, image, messages, masks, object_masks, task, form, turns=None,
                    shapes=None) -> dict:
    """One record of a held-out file: its image, its masks (None: empty) and a mask of all the shapes written as
    PNGs under `folder/<split>/`, the record (training format plus task, form, seed, all_shapes; with `turns`, the
    v3 tag of each assistant turn and the scene's `shapes` as [kind, colour, size, cx, cy]) returned."""
    folder = Path(folder)
    (folder / split / "images").mkdir(parents=True, exist_ok=True)
    (folder / split / "masks").mkdir(parents=True, exist_ok=True)
    name = f"{seed:09d}"
    image_path = f"{split}/images/{name}.png"
    image.save(folder / image_path)
    specs = []
    for k, mask in enumerate(masks):
        if mask is None:
            specs.append({"empty": True})
            continue
        specs.append({"png": f"{split}/masks/{name}_{k}.png"})
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / specs[-1]["png"])
    all_shapes = f"{split}/masks/{name}_all.png"
    Image.fromarray(np.any(object_masks, axis=0).astype(np.uint8) * 255).save(folder / all_shapes)
    record = {"image": image_path, "messages": messages, "masks": specs, "task": task, "form": form, "seed": seed,
              "all_shapes": all_shapes}
    if turns is not None:
        record.update(turns=turns, shapes=[[s.kind, s.colour, s.size, s.cx, s.cy] for s in shapes])
        record["messages"] = tag_questions(messages, turns)
    return record


def tag_questions(messages: list[dict], turns: list[dict]) -> list[dict]:
    """The messages with each question's answer tagged with its kind (`"kind"`, which training ignores), so that
    `stamp-hf eval` on these records gives VQA exact match per kind; `turns` has one tag per assistant turn."""
    answers = iter(turns)
    return [dict(m, kind=tag["kind"]) if m["role"] == "assistant" and (tag := next(answers))["task"] == "vqa" else m
            for m in messages]


def write_refer_export(folder, count: int, start: int = 0, sentences: int = 3, split: str = "train") -> Path:
    """Scenes of `split` in the gRefCOCO layout (`grefs(unc).json` + COCO `instances.json` with RLE masks, images in
    `images/`), which `stamp-hf prepare-data` reads as it reads gRefCOCO: per scene `sentences` references (present
    and absent ones, as ABSENT_SHARE says), each a bare referring expression ("red circle", "all the stars")."""
    from pycocotools import mask as mask_utils

    folder = Path(folder)
    _check_new(folder / "grefs(unc).json")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, refs = [], [], []
    for number, seed in enumerate(split_seeds(split, count, start)):
        rng = random.Random(seed)
        shapes, image, object_masks = draw_scene(rng)
        name = f"{seed:09d}.png"
        image.save(folder / "images" / name)
        width, height = image.size
        images.append({"id": number, "file_name": name, "width": width, "height": height})
        ids = []
        for mask in object_masks:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            ids.append(len(annotations) + 1)
            annotations.append({"id": ids[-1], "image_id": number, "category_id": 1, "iscrowd": 0,
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                                "area": int(mask.sum()), "bbox": [0, 0, 0, 0]})
        for k in range(sentences):
            present = rng.random() >= ABSENT_SHARE
            found = find_reference(rng, shapes, image.size, rng.choice(FORMS), present)
            if found is None:
                continue
            reference, members = found
            text = reference.phrase(rng, article=rng.random() < 0.3)
            refs.append({"ref_id": len(refs), "image_id": number, "file_name": name, "split": split,
                         "ann_id": [ids[i] for i in members] or [-1], "category_id": [1] * len(members) or [-1],
                         "no_target": not members, "sent_ids": [len(refs)],
                         "sentences": [{"sent_id": len(refs), "sent": text, "raw": text, "tokens": text.split()}]})
    instances = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "shape"}]}
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / "grefs(unc).json").write_text(json.dumps(refs))
    return folder


def write_dialogue_export(path, count: int, start: int = 0, turns: int = 3, split: str = "train",
                          version: str = "v2") -> Path:
    """Scenes of `split` as LLaVA instruction data (a JSON list of {"id", "image", "conversations"}, images in
    `<stem>_images/`): per scene `turns` questions and answers (`question`; `version` "v3": stamp_hf.synthetic.chats's
    questions of every kind, in people's wordings), the first with the `<image>` tag."""
    from .chats import VERSIONS, ask

    if version not in VERSIONS:
        raise ValueError(f"unknown data version {version!r}; expected one of {VERSIONS}")
    path = Path(path)
    _check_new(path)
    image_folder = path.parent / f"{path.stem}_images"
    image_folder.mkdir(parents=True, exist_ok=True)
    conversations = []
    for seed in split_seeds(split, count, start):
        rng = random.Random(seed)
        shapes, image, _ = draw_scene(rng)
        name = f"{seed:09d}.png"
        image.save(image_folder / name)
        turns_of_scene = []
        for k in range(turns):
            if version == "v2":
                _, text, reply, _ = question(rng, shapes, image.size)
            else:
                _, text, reply, _ = ask(rng, shapes, image.size)
                text = vary(rng, text)
            turns_of_scene += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + text},
                               {"from": "gpt", "value": reply}]
        conversations.append({"id": str(seed), "image": name, "conversations": turns_of_scene})
    path.write_text(json.dumps(conversations, indent=1))
    return path


__all__ = [
    "COLOURS",
    "COLOUR_SHADES",
    "FORMS",
    "IMAGE_SIZES",
    "SHAPES",
    "SPLIT_SEEDS",
    "Reference",
    "Sample",
    "Shape",
    "draw_scene",
    "find_reference",
    "make_sample",
    "question",
    "request",
    "split_seeds",
    "unique_descriptions",
    "write_dialogue_export",
    "write_refer_export",
    "write_split",
]
