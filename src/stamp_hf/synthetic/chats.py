"""The generator's v3 conversations: questions about every attribute a scene has, chats that switch between questions
and segmentation requests and refer back, and requests for two or three targets, each `<|seg|>` labelled with what it
segments. `make_sample(seed, version="v3")` and the writers of scenes / drawn with `version="v3"` use them; "v2" (the
default there) keeps the data of the demo model's first `stamp-hf train` stage, byte for byte.

Rules (those of scenes.py, kept):
- No wording shortcut: a target that is not there is asked and answered in the same words as one that is; only its
  mask is empty. A segmentation answer names each target before its `<|seg|>` ("The red circle is <|seg|> and the
  blue square is <|seg|>."), echoing the request's phrase (with "the", in lower case), so the label a user sees says
  what was segmented. In a multi-target request an absent target keeps its `<|seg|>` with an empty mask (the
  gRefCOCO convention for a no-target expression, per target): dropping it would shift every later label onto the
  wrong mask and make the number of `<|seg|>` tell which targets are there.
- A question never names what it asks; every answer is one exact sentence (exact-match scoring).
- Refer-backs ("segment it", "and the other one", "the one left of it") are labelled with the shape's unique name
  ("the red circle", else "the big red circle"); scenes where it has none never get them.

Each assistant turn carries a tag (record field "turns"): {"task": "vqa", "kind": K} or {"task": "seg", "move": M,
"present": [bool per <|seg|>]} with M one of MOVES, so a benchmark scores each kind apart (stamp_hf.synthetic.scoring).
"""

import random

from .scenes import (
    ABSENT_SHARE,
    ATTRIBUTE_FORMS,
    FORMS,
    MARGIN,
    MULTI_PROMPTS,
    RELATIONS,
    SINGLE_PROMPTS,
    Reference,
    count_sentence,
    describe_scene,
    find_reference,
    unique_descriptions,
    vary,
)

VERSIONS = ("v2", "v3")
TASKS_V3 = {"refer": 0.2, "none": 0.07, "vqa": 0.25, "chat": 0.3, "multi": 0.18}
QUESTION_KINDS_V3 = ("count", "colour", "kind", "size", "position", "exists", "relation", "describe")
# How a segmentation turn names its target(s): a direct request as the first turn or after other turns, "it", "the
# other one", "the one left of it", or two or three targets at once.
MOVES = ("first", "switch", "it", "other", "relative", "multi")
REFER_BACK = {"it": ("Please segment it.", "Segment it.", "Show it to me.", "Now segment it.", "Can you segment it?"),
              "other": ("And the other one?", "Now the other one.", "Segment the other one.", "What about the other one?",
                        "Please segment the other one too.")}
RELATIVE_PROMPTS = ("And the one {} it?", "Now the one {} it.", "Segment the shape {} it.", "What about the one {} it?")
SWITCH_PREFIXES = ("", "", "Now ", "And now ", "Then ")

COLOUR_QUESTIONS = ("What {c} is {x}?", "What is the {c} of {x}?", "Which {c} is {x}?", "What {c} does {x} have?")
KIND_QUESTIONS = ("What shape is {x}?", "What kind of shape is {x}?", "What is {x}?", "Which shape is {x}?")
SIZE_QUESTIONS = ("Is {x} big or small?", "Is {x} large or small?", "Is {x} small or big?", "Is {x} small or large?",
                  "What size is {x}?")
SIDE_QUESTIONS = ("Is {x} on the left or on the right?", "Is {x} on the left or the right?", "Which side is {x} on?")
HEIGHT_QUESTIONS = ("Is {x} at the top or at the bottom?", "Is {x} near the top or the bottom?")
WHERE_QUESTIONS = ("Where is {x}?", "Where is {x} in the image?")
EXISTS_QUESTIONS = ("Is there {a}?", "Do you see {a}?", "Is there {a} in the image?", "Can you see {a}?")
COUNT_QUESTIONS = ("How many {n} are there?", "How many {n} can you see?", "How many {n} are in the image?",
                   "Count the {n}.")
RELATION_YES_NO = ("Is {x} {r} {y}?",)
RELATION_WHICH = ("What is {r} {y}?", "Which shape is {r} {y}?", "What shape is {r} {y}?")
DESCRIBE_QUESTIONS = ("Describe the image.", "What is in the image?", "What do you see?", "What shapes are in the picture?",
                      "List the shapes.", "Describe the picture.")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def shape_name(shapes, target: int, frame) -> str | None:
    """The shape's unique name in a fixed wording, "the red circle" (else with its size, "the big red circle"), or None
    when neither picks it out alone."""
    s = shapes[target]
    for form, words in (("colour+kind", (s.colour, s.kind)), ("size+colour+kind", (s.size, s.colour, s.kind))):
        if Reference(form, **{n: getattr(s, n) for n in ATTRIBUTE_FORMS[form]}).members(shapes, frame) == [target]:
            return "the " + " ".join(words)
    return None


def seg_answer(names: list[str]) -> str:
    """The answer to a request for `names` (the request's phrases): each named before its `<|seg|>`, "are" after a
    plural ("all the circles")."""
    parts = [f"{name} {'are' if name.startswith('all ') else 'is'} <|seg|>" for name in names]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return capital(listed) + "."


def listing(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def drop_article(phrase: str) -> str:
    """The phrase as typed without its leading "the" (1 request in 5)."""
    return phrase[4:] if phrase.startswith("the ") else phrase


# ---------------------------------------------------------------------------------------------- requests


def direct_request(rng: random.Random, shapes, frame, present: bool, avoid=(), forms=FORMS):
    """(form, phrase, members) of a reference of a form drawn from `forms` that picks out something (`present`) or
    nothing, whose members share none of `avoid`; None if the scene allows none."""
    for form in rng.sample(forms, len(forms)):
        found = find_reference(rng, shapes, frame, form, present)
        if found is not None and not set(found[1]) & set(avoid):
            reference, members = found
            return form, reference.phrase(rng), members
    return None


def single_request(rng, shapes, frame, present: bool, avoid=(), prefix: str = ""):
    """A one-target request: (form, request, answer, members), or None."""
    found = direct_request(rng, shapes, frame, present, avoid)
    if found is None:
        return None
    form, phrase, members = found
    template = rng.choice(MULTI_PROMPTS if phrase.startswith(("all ", "every ")) else SINGLE_PROMPTS)
    text = template.format(drop_article(phrase) if rng.random() < 0.2 else phrase)
    if prefix:
        text = prefix + text[0].lower() + text[1:]
    return form, vary(rng, text), seg_answer([phrase]), members


def multi_request(rng, shapes, frame, targets: int):
    """A request for `targets` (2 or 3) distinct targets, each present or absent as ABSENT_SHARE says, present ones
    sharing no shape: (request, answer, [members per target], [form per target]); None in a scene of fewer shapes
    or when the draw does not fit the scene."""
    if len(shapes) < targets:  # else fewer present targets fit, and absent ones would be over-represented
        return None
    phrases, members_of, forms = [], [], []
    for _ in range(targets):
        taken = [i for members in members_of for i in members]
        found = direct_request(rng, shapes, frame, rng.random() >= ABSENT_SHARE, taken)
        if found is None or found[1] in phrases:
            return None
        forms.append(found[0])
        phrases.append(found[1])
        members_of.append(found[2])
    typed = [drop_article(p) for p in phrases] if rng.random() < 0.2 else phrases
    text = vary(rng, rng.choice(MULTI_PROMPTS).format(listing(typed)))
    return text, seg_answer(phrases), members_of, forms


# ---------------------------------------------------------------------------------------------- questions


def _noun_phrase(rng, reference: Reference) -> str:
    """The reference with "the", sometimes "the red one" for "the red shape"."""
    phrase = reference.phrase(rng)
    if phrase.endswith(" shape") and phrase != "the shape" and rng.random() < 0.4:
        phrase = phrase[: -len("shape")] + "one"
    return phrase


def attribute_question(rng, shapes, frame, kind: str, target: int, subject: str | None = None):
    """A colour / kind / size / position question about `target`, named without the asked attribute (or as
    `subject`, e.g. "it"): (question, answer) or None."""
    s = shapes[target]
    horizontal = abs(s.cx - frame[0] / 2) >= MARGIN * frame[0]
    vertical = abs(s.cy - frame[1] / 2) >= MARGIN * frame[1]
    if kind == "position" and not (horizontal or vertical):
        return None
    if subject is None:
        hidden = {"colour": "colour", "kind": "kind", "size": "size", "position": None}[kind]
        names = unique_descriptions(shapes, target, frame, [f for f in ATTRIBUTE_FORMS if hidden not in ATTRIBUTE_FORMS[f]])
        if not names:
            return None
        subject = _noun_phrase(rng, rng.choice(names))
    if kind == "colour":
        return rng.choice(COLOUR_QUESTIONS).format(c=rng.choice(("colour", "color")), x=subject), f"It is {s.colour}."
    if kind == "kind":
        return rng.choice(KIND_QUESTIONS).format(x=subject), f"It is {article(s.kind)}."
    if kind == "size":
        return rng.choice(SIZE_QUESTIONS).format(x=subject), f"It is {s.size}."
    side = "left" if s.cx < frame[0] / 2 else "right"
    height = "top" if s.cy < frame[1] / 2 else "bottom"
    options = ([("side", rng.choice(SIDE_QUESTIONS), f"It is on the {side}.")] if horizontal else []) + (
        [("height", rng.choice(HEIGHT_QUESTIONS), f"It is at the {height}.")] if vertical else []) + (
        [("where", rng.choice(WHERE_QUESTIONS), f"It is at the {height} {side}.")] if horizontal and vertical else [])
    _, template, reply = rng.choice(options)
    return template.format(x=subject), reply


def holds(shapes, frame, a: int, b: int, relation: str) -> bool:
    """Whether shape `a` is `relation` (a key of RELATIONS) shape `b` by the margin the references use."""
    margin = MARGIN * (frame[0] + frame[1]) / 2
    s, o = shapes[b], shapes[a]
    return {"left of": o.cx <= s.cx - margin, "right of": o.cx >= s.cx + margin,
            "above": o.cy <= s.cy - margin, "below": o.cy >= s.cy + margin}[relation]


def relation_question(rng, shapes, frame):
    """"Is the red circle left of the blue star?" (yes or no, each only where the relation or its opposite holds by
    the margin) or "What is left of the blue star?" (exactly one shape there): (question, answer, members) or None."""
    triples = [(a, b, r) for a in range(len(shapes)) for b in range(len(shapes)) for r in RELATIONS if a != b]
    rng.shuffle(triples)
    wanted = rng.choice(("yes", "no", "which"))
    for a, b, relation in triples:
        x, y = shape_name(shapes, a, frame), shape_name(shapes, b, frame)
        words = rng.choice(RELATIONS[relation])
        if y is None:
            continue
        if wanted == "which":
            members = [i for i in range(len(shapes)) if i != b and holds(shapes, frame, i, b, relation)]
            if len(members) == 1:
                s = shapes[members[0]]
                return rng.choice(RELATION_WHICH).format(r=words, y=y), f"It is {article(s.colour + ' ' + s.kind)}.", members
            continue
        yes, no = holds(shapes, frame, a, b, relation), holds(shapes, frame, a, b, OPPOSITE[relation])
        if x is not None and ((wanted == "yes" and yes) or (wanted == "no" and no)):
            return rng.choice(RELATION_YES_NO).format(x=x, r=words, y=y), "Yes, it is." if yes else "No, it is not.", [a]
    return None


EXISTENCE_FORMS = ("kind", "colour", "colour+kind", "size+kind")


def existence_question(rng, shapes, frame):
    """"Is there a red circle?" about a reference of EXISTENCE_FORMS, present or absent with equal chance: (question,
    answer, members, reference) or None when the scene has no such reference."""
    present = rng.random() < 0.5
    found = find_reference(rng, shapes, frame, rng.choice(EXISTENCE_FORMS), present)
    if found is None:
        return None
    reference, members = found
    reply = "Yes, there is." if present else "No, there is not."
    return rng.choice(EXISTS_QUESTIONS).format(a=article(reference.noun(rng))), reply, members, reference


def ask(rng: random.Random, shapes, frame, kind: str | None = None):
    """A question with one exact answer about the scene: (kind, question, answer, members it is about). Falls back to
    a count when the scene has no question of `kind` (e.g. no shape with a unique name)."""
    kind = kind or rng.choice(QUESTION_KINDS_V3)
    if kind in ("colour", "kind", "size", "position"):
        target = rng.randrange(len(shapes))
        found = attribute_question(rng, shapes, frame, kind, target)
        if found is not None:
            return kind, *found, [target]
    elif kind == "exists":
        found = existence_question(rng, shapes, frame)
        if found is not None:
            return kind, *found[:3]
    elif kind == "relation":
        found = relation_question(rng, shapes, frame)
        if found is not None:
            return kind, *found
    elif kind == "describe":
        return kind, rng.choice(DESCRIBE_QUESTIONS), describe_scene(shapes), list(range(len(shapes)))
    s = rng.choice(shapes)
    reference = rng.choice([Reference("count"), Reference("count", kind=s.kind), Reference("count", colour=s.colour),
                            Reference("count", kind=s.kind, colour=s.colour),
                            Reference("count", kind=rng.choice(("circle", "square", "triangle", "star", "diamond")))])
    members = reference.matching(shapes)
    singular, plural = reference.noun(random.Random(0)), reference.noun(random.Random(0), plural=True)
    return "count", rng.choice(COUNT_QUESTIONS).format(n=plural), count_sentence(len(members), singular, plural), members


# ---------------------------------------------------------------------------------------------- chats


def _relative(shapes, frame, focus: int):
    """(relation, members) of each "the one <relation> it" with `focus` as the anchor that at most one shape
    satisfies (members [] when none is there)."""
    options = []
    for relation in RELATIONS:
        members = [i for i in range(len(shapes)) if i != focus and holds(shapes, frame, i, focus, relation)]
        if len(members) <= 1:
            options.append((relation, members))
    return options


def _other(shapes, focus: int, said: str) -> int | None:
    """"The other one": the other shape of a two-shape scene, or the one other shape of the focus's kind when the
    last exchange (`said`, lower case) named that kind; else None."""
    if len(shapes) == 2:
        return 1 - focus
    same = [i for i, s in enumerate(shapes) if s.kind == shapes[focus].kind and i != focus]
    return same[0] if len(same) == 1 and shapes[focus].kind in said else None


ATTRIBUTE_WORDS = {"colour": lambda s: (s.colour,), "kind": lambda s: (s.kind,),
                   "size": lambda s: ("big", "large") if s.size == "big" else ("small", "little"),
                   "position": lambda s: ("left", "right", "top", "bottom")}


def chat(rng: random.Random, shapes, frame, turns: int | None = None):
    """A chat of 2 to 4 user turns about one scene: (messages, [members per <|seg|> in order], [tag per assistant
    turn]). It opens with a question or a request; then questions (also about "it"), "segment it", "the other one",
    "the one left of it" and new requests about other shapes take turns; after an absent target the next request is
    for a present one. A question about "it" never asks what the chat already named."""
    turns = turns or rng.choice((2, 2, 3, 3, 4))
    messages, masks, tags = [], [], []
    focus, focus_asked, last_absent = None, False, False
    for _ in range(8 * turns):
        if len(tags) == turns:
            break
        moves = ["question", "switch"]
        said = " ".join(m["content"] for m in messages[-2:]).lower()  # the last exchange
        if focus is not None and shape_name(shapes, focus, frame) is not None:
            other = _other(shapes, focus, said)
            moves += ["it"] * 3 if focus_asked else ["pronoun"]
            moves += ["other"] * 2 if other is not None and shape_name(shapes, other, frame) is not None else []
            moves += ["relative"] if _relative(shapes, frame, focus) else []
        move = "switch" if last_absent else rng.choice(moves)
        if move in ("question", "pronoun"):
            if move == "pronoun":
                kinds = [k for k in ("colour", "kind", "size", "position")
                         if not any(w in said for w in ATTRIBUTE_WORDS[k](shapes[focus]))]
                kind = rng.choice(kinds) if kinds else None
                found = attribute_question(rng, shapes, frame, kind, focus, subject="it") if kind else None
                if found is None:
                    continue
                (text, reply), members = found, [focus]
            else:
                kind, text, reply, members = ask(rng, shapes, frame, rng.choice(QUESTION_KINDS_V3 + ("colour", "kind")))
                text = vary(rng, text)
            about_one = kind in ("colour", "kind", "size", "position") or (kind == "relation" and len(members) == 1)
            focus, focus_asked = (members[0], True) if about_one else (None, False)
            tag = {"task": "vqa", "kind": kind}
        else:
            if move == "switch":
                present = last_absent or rng.random() >= ABSENT_SHARE
                prefix = rng.choice(SWITCH_PREFIXES) if messages else ""
                found = single_request(rng, shapes, frame, present, [focus] if focus is not None else (), prefix)
                if found is None:
                    continue
                _, text, reply, members = found
            elif move == "relative":
                options = _relative(shapes, frame, focus)
                present = [o for o in options if o[1]] if rng.random() < 0.5 else []
                relation, members = rng.choice(present or [o for o in options if not o[1]] or options)
                words = rng.choice(RELATIONS[relation])
                text = rng.choice(RELATIVE_PROMPTS).format(words)
                reply = seg_answer([f"the shape {words} {shape_name(shapes, focus, frame)}"])
            else:
                members = [focus if move == "it" else _other(shapes, focus, said)]
                text, reply = rng.choice(REFER_BACK[move]), seg_answer([shape_name(shapes, members[0], frame)])
            masks.append(members)
            tag = {"task": "seg", "move": move if messages else "first", "present": [bool(members)]}
            last_absent = not members
            focus = members[0] if len(members) == 1 else (focus if move == "relative" else None)
            focus_asked = False
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        tags.append(tag)
    return messages, masks, tags


def conversation(rng: random.Random, shapes, frame, task: str):
    """One v3 conversation of `task` (a key of TASKS_V3): (messages, [members per <|seg|>], tags, task, form). A
    scene that allows no such conversation gets a question instead (task "vqa")."""
    if task in ("refer", "none"):
        found = single_request(rng, shapes, frame, present=task == "refer")
        if found is not None:
            form, text, reply, members = found
            tag = {"task": "seg", "move": "first", "present": [bool(members)]}
            return [_user(text), _assistant(reply)], [members], [tag], task, form
    elif task == "multi":
        found = multi_request(rng, shapes, frame, rng.choice((2, 2, 3)))
        if found is not None:
            text, reply, members_of, _ = found
            tag = {"task": "seg", "move": "multi", "present": [bool(m) for m in members_of]}
            return [_user(text), _assistant(reply)], members_of, [tag], task, f"multi{len(members_of)}"
    elif task == "chat":
        messages, members_of, tags = chat(rng, shapes, frame)
        if len(tags) >= 2:
            return messages, members_of, tags, task, "chat"
    elif task != "vqa":
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(TASKS_V3)}")
    kind, text, reply, _ = ask(rng, shapes, frame)
    return [_user(vary(rng, text)), _assistant(reply)], [], [{"task": "vqa", "kind": kind}], "vqa", kind


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


__all__ = ["MOVES", "QUESTION_KINDS_V3", "TASKS_V3", "VERSIONS", "ask", "chat", "conversation", "holds", "multi_request",
           "seg_answer", "shape_name", "single_request"]
