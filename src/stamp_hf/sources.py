"""Readers of the public dataset formats STAMP is trained and evaluated on, one per format, shared by `stamp-hf eval`
(stamp_hf.evaluation) and `stamp-hf prepare-data` (stamp_hf.prepare):

- REFER (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF): `root/refs(SPLIT_BY).p` (a pickle) + `root/instances.json` (COCO);
- gRefCOCO: `root/grefs(SPLIT_BY).json` + `root/instances.json`; a reference points at any number of objects;
- ReasonSeg (LISA): `folder[/split]/NAME.jpg` + `NAME.json` (labelme-style polygons, "target" / "ignore");
- LLaVA instruction data: a JSON list of {"image", "conversations": [{"from": "human" | "gpt", "value"}]}.

Masks come out as mask specifications of the training format (stamp_hf.data: {"polygons": ...} / {"rle": ...}), so
both users decode them with `stamp_hf.data.load_mask`. Problems are one line naming the file and the reference.

The large files are streamed (ijson), never loaded whole: the LLaVA list (the 665k mix is about 1 GB of JSON, several
GB as Python objects), gRefCOCO's grefs(*).json and COCO's instances.json, of which only the images and annotations
the split's references name are kept. The REFER and gRefCOCO readers yield references one at a time, so memory
follows what a split needs, not the size of the files. A REFER refs(*).p pickle is read whole: a pickle has no
streaming reader.
"""

import json
import pickle
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class ReferAnnotation:
    """One reference of a REFER / gRefCOCO split: its image, its sentences and the masks of the objects it names
    (`targets` empty: a gRefCOCO no-target reference)."""

    ref_id: int | str
    image: Path
    size: tuple[int, int]  # (width, height), from instances.json
    sentences: list[tuple[int | str, str]]  # (sent_id, sentence)
    targets: list[dict] = field(default_factory=list)


@dataclass
class ReasonSegAnnotation:
    """One ReasonSeg image: its queries (`texts`; `is_sentence`: long reasoning queries rather than phrases) and its
    target and ignore polygons as mask specifications."""

    name: str
    image: Path
    texts: list[str]
    is_sentence: bool
    targets: list[dict]
    ignore: list[dict]


@dataclass
class LlavaSample:
    """One LLaVA sample: the image and the turns as training-format messages (the `<image>` marker taken out)."""

    id: str
    image: Path
    messages: list[dict]


# ---------------------------------------------------------------------------------------------------- format


def detect_format(data, split: str | None = None) -> str:
    """Which format `data` is, from its layout: "jsonl" (a .jsonl file of the training format), "llava" (a .json file),
    "grefcoco" / "refer" (a folder with grefs(*).json / refs(*).p) or "reasonseg" (a folder of NAME.json annotations,
    optionally in `split`)."""
    data = Path(data)
    if data.is_file():
        if data.suffix == ".jsonl":
            return "jsonl"
        if data.suffix == ".json":
            return "llava"
    elif data.is_dir():
        if any(data.glob("grefs(*).json")):
            return "grefcoco"
        if any(data.glob("refs(*).p")):
            return "refer"
        if any((data / split if split else data).glob("*.json")) and not (data / "instances.json").exists():
            return "reasonseg"
    else:
        raise FileNotFoundError(f"no such data file or folder: {data}")
    raise ValueError(
        f"{data}: not a known dataset format (expected a REFER folder with refs(*).p + instances.json, a gRefCOCO "
        "folder with grefs(*).json + instances.json, a ReasonSeg folder of NAME.json + NAME.jpg, a LLaVA .json file "
        "or a .jsonl file of the training format)"
    )


# ---------------------------------------------------------------------------------------------------- streamed JSON


def import_ijson():
    """ijson, the streaming JSON parser the large files are read with, or a one-line ImportError with pip's command."""
    try:
        import ijson
    except ImportError:
        raise ImportError("reading dataset JSON files in pieces needs ijson: pip install 'stamp-hf[train]'") from None
    return ijson


def json_list(path: Path, label: str, what: str) -> Iterator:
    """The items of the JSON list in `path`, parsed one at a time. Checked now: ijson is installed and the file is a
    list (else "`path`: not `what`"); a syntax error later is one line naming the file and the `label` (sample,
    reference) at which it stopped."""
    ijson = import_ijson()
    with path.open("rb") as file:
        if _first_byte(file) != b"[":
            raise ValueError(f"{path}: not {what}")
    return _json_items(ijson, path, "item", label)


def json_items(path: Path, prefix: str) -> Iterator:
    """The values at `prefix` of the JSON file `path` (ijson's notation: "images.item" is each item of the top-level
    "images" list), parsed one at a time."""
    return _json_items(import_ijson(), path, prefix, None)


def _json_items(ijson, path: Path, prefix: str, label: str | None) -> Iterator:
    """Numbers come as json.load reads them (int, float; not ijson's default Decimal), so records keep their bytes."""
    count = 0
    with path.open("rb") as file:
        try:
            for item in ijson.items(file, prefix, use_float=True):
                yield item
                count += 1
        except ijson.JSONError as error:
            where = f" at {label} {count}" if label else ""
            raise ValueError(f"{path}: not valid JSON{where} ({str(error).splitlines()[0]})") from None


def _first_byte(file) -> bytes:
    while chunk := file.read(1 << 16):
        if stripped := chunk.lstrip():
            return stripped[:1]
    return b""


# ---------------------------------------------------------------------------------------------------- REFER, gRefCOCO


def read_pickle(path: Path, allow_pickle: bool):
    """A pickle, only when the user opted in: loading one can run arbitrary code."""
    if not allow_pickle:
        raise ValueError(
            f"{path} is a pickle, and loading a pickle can run arbitrary code; pass allow_pickle=True "
            "(--allow-pickle) only if you trust the file"
        )
    with path.open("rb") as f:
        return pickle.load(f)


def read_refer(root, split: str, split_by: str = "unc", image_root=None, allow_pickle: bool = False
               ) -> Iterator[ReferAnnotation]:
    """The references of `split` in a REFER folder (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF), one at a time; images under
    `image_root` (COCO train2014, or saiapr_tc-12 for RefCLEF; default: the folder itself)."""
    refs_file = _refs_file(root, f"refs({split_by}).p")
    refs = read_pickle(refs_file, allow_pickle)
    return _references(refs_file, lambda: refs, split, image_root)


def read_grefcoco(root, split: str, split_by: str = "unc", image_root=None) -> Iterator[ReferAnnotation]:
    """The references of `split` in a gRefCOCO folder, one at a time: `ann_id` a list, and `no_target` references
    (ann_id [-1]) that name nothing in the image. grefs(*).json is streamed twice (the ids the split needs, then the
    references), never held."""
    refs_file = _refs_file(root, f"grefs({split_by}).json")
    what = "a gRefCOCO references file (a JSON list)"
    json_list(refs_file, "reference", what)  # checked now, read twice below
    return _references(refs_file, lambda: json_list(refs_file, "reference", what), split, image_root)


def _refs_file(root, name) -> Path:
    refs_file = Path(root) / name
    if not refs_file.is_file():
        raise FileNotFoundError(f"{refs_file} not found")
    return refs_file


def _instances_file(root: Path) -> Path:
    instances = root / "instances.json"
    if not instances.is_file():
        raise FileNotFoundError(f"{instances} not found: the REFER layout has it next to the refs file")
    return instances


def _coco(instances: Path, image_ids: set, annotation_ids: set) -> tuple[dict, dict]:
    """The annotations and images of instances.json (by id) that the ids name. The file (COCO train2014's, a few
    hundred MB) is streamed once for each list, and the other entries dropped as they are read."""
    try:
        annotations = _kept(json_items(instances, "annotations.item"), annotation_ids)
        images = _kept(json_items(instances, "images.item"), image_ids)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{instances}: not COCO instances ({type(error).__name__}: {error})") from None
    return annotations, images


def _kept(entries: Iterable[dict], ids: set) -> dict:
    """The entries whose "id" is in `ids`, by id (the last one of a repeated id, as a dict of the whole list keeps)."""
    return {entry["id"]: entry for entry in entries if entry["id"] in ids}


def _split_ids(refs: Iterable, split: str) -> tuple[set, set]:
    """The image and annotation ids the references of `split` point at. Malformed references are passed over here and
    reported when they are read."""
    image_ids, annotation_ids = set(), set()
    for ref in refs:
        if not isinstance(ref, dict) or ref.get("split") != split:
            continue
        ann_ids = ref.get("ann_id") if isinstance(ref.get("ann_id"), list) else [ref.get("ann_id")]
        image_ids.update(i for i in [ref.get("image_id")] if isinstance(i, Hashable))
        annotation_ids.update(i for i in ann_ids if isinstance(i, Hashable))
    return image_ids, annotation_ids


def _mask_spec(segmentation) -> dict | None:
    """COCO's segmentation as a mask specification; polygon parts of under 3 points (a few in COCO, zero area) are
    left out, as pycocotools would read a 2-point part as a box. None: nothing is left."""
    if not isinstance(segmentation, list):
        return {"rle": segmentation}
    polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
    return {"polygons": polygons} if polygons else None


def _references(refs_file: Path, refs: Callable[[], Iterable], split: str, image_root) -> Iterator[ReferAnnotation]:
    """The references of `split`; `refs()` gives the file's references from the start, once for the ids the split
    needs from instances.json and once to read them."""
    instances = _instances_file(refs_file.parent)
    import_ijson()
    return _split_references(refs_file, refs, split, Path(image_root) if image_root else refs_file.parent, instances)


def _split_references(refs_file: Path, refs: Callable[[], Iterable], split: str, image_root: Path, instances: Path):
    annotations, images = _coco(instances, *_split_ids(refs(), split))
    existing: dict[Path, bool] = {}
    found = False
    for number, ref in enumerate(refs()):
        try:
            reference = _reference(ref, split, annotations, images, image_root, existing, f"{refs_file}: ref")
        except (KeyError, TypeError) as error:
            raise ValueError(f"{refs_file}: reference {number} is not in the REFER format "
                             f"({type(error).__name__}: {error})") from None
        if reference is not None:
            found = True
            yield reference
    if not found:
        raise ValueError(f"{refs_file} has no references in split {split!r}")


def _reference(ref: dict, split: str, annotations: dict, images: dict, image_root: Path, existing: dict, where: str):
    """The ReferAnnotation of `ref` if it is in `split`, else None; its image must exist and its objects have masks."""
    if ref["split"] != split:
        return None
    where = f"{where} {ref['ref_id']}"
    info = images.get(ref["image_id"])
    if info is None:
        raise ValueError(f"{where}: image {ref['image_id']} is not in instances.json")
    image = image_root / info["file_name"]
    if image not in existing:
        existing[image] = image.is_file()
    if not existing[image]:
        raise FileNotFoundError(f"{where}: image {image} not found (--images / image_root is the image folder)")
    targets = [] if ref.get("no_target") else _targets(ref, annotations, where)
    size = (info["width"], info["height"]) if "width" in info and "height" in info else _image_size(image)
    sentences = [(s["sent_id"], s["sent"]) for s in ref["sentences"]]
    return ReferAnnotation(ref["ref_id"], image, size, sentences, targets)


def _targets(ref: dict, annotations: dict, where: str) -> list[dict]:
    """The mask specifications of a reference's objects; a reference that should have a mask and has none is an error."""
    ann_ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    targets = []
    for ann_id in ann_ids:
        if ann_id == -1:
            continue
        annotation = annotations.get(ann_id)
        spec = _mask_spec(annotation.get("segmentation") or []) if annotation is not None else None
        if spec is None:
            reason = "is not in instances.json" if annotation is None else "has no segmentation"
            raise ValueError(f"{where} has no mask: its annotation {ann_id} {reason}")
        targets.append(spec)
    if not targets:
        raise ValueError(f"{where} has no mask: it names no annotation and is not marked no_target")
    return targets


def _image_size(image: Path) -> tuple[int, int]:
    try:
        with Image.open(image) as file:  # reads the header only
            return file.size
    except OSError as error:
        raise OSError(f"cannot read image {image}: {error}") from None


# ---------------------------------------------------------------------------------------------------- ReasonSeg


def read_reasonseg(folder, split: str | None = None) -> list[ReasonSegAnnotation]:
    """The annotations of a ReasonSeg folder (or its `split` subfolder), sorted by name."""
    folder = Path(folder) / split if split else Path(folder)
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no ReasonSeg .json annotations in {folder}")
    annotations = []
    for file in files:
        annotation = json.loads(file.read_text())
        if not isinstance(annotation, dict) or not {"text", "shapes"} <= annotation.keys():
            raise ValueError(f"{file}: not a ReasonSeg annotation (needs 'text' and 'shapes')")
        image = next((file.with_suffix(s) for s in IMAGE_SUFFIXES if file.with_suffix(s).exists()), None)
        if image is None:
            raise FileNotFoundError(f"no image next to {file}")
        polygons = {"target": [], "ignore": []}
        for shape in annotation["shapes"]:
            label = "ignore" if shape["label"].lower() == "ignore" else "target"
            polygons[label].append({"polygons": [[float(v) for point in shape["points"] for v in point]]})
        texts = annotation["text"] if isinstance(annotation["text"], list) else [annotation["text"]]
        annotations.append(ReasonSegAnnotation(file.stem, image, texts, bool(annotation.get("is_sentence")),
                                               polygons["target"], polygons["ignore"]))
    return annotations


def reasonseg_size(annotation: ReasonSegAnnotation) -> tuple[int, int]:
    """(width, height) of the annotation's image (the JSON does not say)."""
    return _image_size(annotation.image)


# ---------------------------------------------------------------------------------------------------- LLaVA


LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
IMAGE_MARKER = "<image>"


def read_llava(path, image_root=None) -> Iterator[LlavaSample | None]:
    """The samples of a LLaVA instruction file, streamed one at a time: a LlavaSample for each conversation with an
    image (images under `image_root`, default the file's folder), None for a text-only one (the training format pairs
    every record with an image, so those are left out and counted)."""
    path = Path(path)
    samples = json_list(path, "sample", "the LLaVA instruction format (a JSON list of {image, conversations})")
    return _llava_samples(path, samples, Path(image_root) if image_root else path.parent)


def _llava_samples(path: Path, samples: Iterator, image_root: Path) -> Iterator[LlavaSample | None]:
    with_image = False
    for number, sample in enumerate(samples):
        where = f"{path}: sample {number}"
        if not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
            raise ValueError(f"{where}: not the LLaVA instruction format (needs 'conversations', a list of turns)")
        if "image" not in sample:
            yield None
            continue
        image = image_root / sample["image"]
        if not image.is_file():
            raise FileNotFoundError(f"{where}: image {image} not found (--images / image_root is the image folder)")
        with_image = True
        yield LlavaSample(str(sample.get("id", number)), image, _llava_messages(sample, where))
    if not with_image:
        raise ValueError(f"{path}: no conversation with an image")


def _llava_messages(sample: dict, where: str) -> list[dict]:
    messages = []
    for turn in sample["conversations"]:
        role = LLAVA_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: each turn needs 'from' (human, gpt) and a string 'value'")
        messages.append({"role": role, "content": turn["value"]})
    users = [m for m in messages if m["role"] == "user"]
    if not users or IMAGE_MARKER not in users[0]["content"]:
        raise ValueError(f"{where}: the first human turn has no {IMAGE_MARKER}")
    if sum(m["content"].count(IMAGE_MARKER) for m in messages) != 1:
        raise ValueError(f"{where}: {IMAGE_MARKER} appears more than once (one image per sample)")
    users[0]["content"] = users[0]["content"].replace(IMAGE_MARKER, "").strip()
    return messages


__all__ = [
    "LlavaSample",
    "ReasonSegAnnotation",
    "ReferAnnotation",
    "detect_format",
    "import_ijson",
    "json_items",
    "json_list",
    "read_grefcoco",
    "read_llava",
    "read_pickle",
    "read_reasonseg",
    "read_refer",
    "reasonseg_size",
]
