"""`stamp-hf prepare-data` at paper scale, shared by its tests (test_prepare.py) and benchmarks/dataset_memory.py:
inputs generated in the public formats, the way prepare-data read them before it streamed (every file loaded whole,
every record held), restated as the reference its bytes and peak memory are compared against, and the peak resident
memory of a child process. Nothing here imports torch, so a child running it starts as light as prepare-data does.

- `write_llava_file`: a LLaVA instruction file like llava_v1_5_mix665k.json (multi-turn conversations with escapes
  and non-ASCII text, string, number and missing ids, every 16th sample text-only, as the mix's ShareGPT part).
- `write_refer_folder`: a RefCOCO-like REFER folder (refs(unc).p + instances.json with COCO-sized polygon and RLE
  annotations, most not referenced), or with `grefcoco` a gRefCOCO one (grefs(unc).json, multi-object and no-target
  references). Images are empty files: prepare-data only checks they exist, and takes sizes from instances.json.
- `prepare_in_memory`: the records prepare-data writes for LLaVA, REFER and gRefCOCO, computed the old way (json.load /
  pickle.load of whole files, a list of all records, then written). It restates the conversion from the format's
  definition instead of calling stamp_hf.prepare, so a change there shows as different bytes.
- `peak_rss_mib`: run Python code in child processes; their exit status, stderr and peak resident memory (VmHWM).
"""

import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

from stamp_hf.coco_masks import mask_rle
from stamp_hf.prompts import RES_ANSWERS, RES_QUESTIONS
from stamp_hf.sources import IMAGE_MARKER, LLAVA_ROLES

PLAIN_WORDS = "the a man woman dog cat left right red blue small large shirt car table near far white 3.5".split()
# quotes, backslashes, newlines, tabs and non-ASCII (accents, CJK, an emoji outside the BMP): JSON escapes and UTF-8
SPECIAL_WORDS = ['"quoted"', "back\\slash", "new\nline", "tab\there", "café", "naïve", "東京", "—", "😀", "über",
                 "the"]


class TextPieces:
    """Pieces of generated text: one in 20 cut from the special words, so that escapes and UTF-8 pass through both
    readers; the rest plain ASCII, as most of the public datasets' text is (Python keeps ASCII strings at a byte a
    character, so the whole-file reading's memory is not overstated)."""

    def __init__(self, rng: random.Random, chars: int = 1 << 16):
        self.rng = rng
        self.plain, self.special = (" ".join(rng.choice(words) for _ in range(chars // 5))
                                    for words in (PLAIN_WORDS, SPECIAL_WORDS))

    def __call__(self, shortest: int, longest: int) -> str:
        pool = self.special if self.rng.random() < 0.05 else self.plain
        start = self.rng.randrange(len(pool) - longest)
        return pool[start:start + self.rng.randint(shortest, longest)].strip() or "x"


def write_llava_file(path, samples: int, turns: int = 4, answer_chars: int = 900, images: int = 16,
                     seed: int = 0) -> Path:
    """`samples` conversations of 1 to `turns` question / answer pairs, answers up to `answer_chars` characters; the
    images (`images` files, reused) under `path`'s folder, coco/train2017. With the defaults a sample is about 1.5 KB,
    as in the 665k mix (about 1 GB)."""
    path = Path(path)
    rng = random.Random(seed)
    text = TextPieces(rng)
    folder = path.parent / "coco" / "train2017"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(images):
        (folder / f"{k:012d}.jpg").touch()

    with path.open("w", encoding="utf-8") as out:
        out.write("[\n")
        for n in range(samples):
            conversations = []
            for turn in range(rng.randint(1, turns)):
                question = text(1, 80)
                if turn == 0 and n % 16:
                    question = f"{IMAGE_MARKER}\n{question}" if n % 2 else f"{question}\n{IMAGE_MARKER}"
                conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": text(1, answer_chars)}]
            sample = {"conversations": conversations}
            if n % 16:
                sample["image"] = f"coco/train2017/{n % images:012d}.jpg"
            if n % 5:  # ids: mostly strings, some numbers, some missing (the reader then uses the index)
                sample["id"] = f"{n:012d}" if n % 3 else n
            out.write(("" if n == 0 else ",\n") + json.dumps(sample, ensure_ascii=n % 2 == 0))
        out.write("\n]\n")
    return path


def write_refer_folder(root, sentences: int, grefcoco: bool = False, images: int | None = None,
                       annotations_per_image: int = 10, image_root=None, seed: int = 0) -> Path:
    """A REFER (or gRefCOCO) folder with `sentences` sentences in "train" (about 2.8 a reference, as RefCOCO's 120,624
    in 42,404) and a tenth as many in "val"; `images` images (default: one per 6 train sentences; RefCOCO: 16,994)
    with `annotations_per_image` objects each (polygons of 8 to 40 points; every 25th an uncompressed RLE, as COCO's
    crowd regions), of which the references use one to three. Images (empty files) go in `image_root` (default: the
    folder)."""
    root, rng = Path(root), random.Random(seed)
    image_root = Path(image_root) if image_root else root
    image_root.mkdir(parents=True, exist_ok=True)
    text = TextPieces(rng)
    images = images or max(sentences // 6, 1)
    coco_images, annotations = [], []
    for image_id in range(1, images + 1):
        width, height = rng.choice([(640, 480), (480, 640), (640, 427), (500, 375)])
        name = f"COCO_train2014_{image_id:012d}.jpg"
        coco_images.append({"id": image_id, "file_name": name, "width": width, "height": height,
                            "license": 1, "coco_url": f"http://images.cocodataset.org/train2014/{name}"})
        (image_root / name).touch()
        for _ in range(annotations_per_image):
            annotations.append(_annotation(rng, len(annotations) + 1, image_id, width, height))
    refs, sent_id = [], 0
    for split, count in (("train", sentences), ("val", max(sentences // 10, 1))):
        written = 0
        while written < count:
            image_id = rng.randrange(1, images + 1)
            objects = [(image_id - 1) * annotations_per_image + k + 1
                       for k in rng.sample(range(annotations_per_image), rng.randint(1, 3) if grefcoco else 1)]
            n = min(rng.randint(1, 5), count - written)
            ref = {"ref_id": len(refs), "image_id": image_id, "split": split,
                   "sent_ids": list(range(sent_id, sent_id + n)),
                   "file_name": f"COCO_train2014_{image_id:012d}_{objects[0]}.jpg",
                   "sentences": [_sentence(text(5, 40), sent_id + k) for k in range(n)]}
            if grefcoco:
                no_target = rng.random() < 0.1
                ref.update(ann_id=[-1] if no_target else objects, no_target=no_target,
                           category_id=[-1] if no_target else [1] * len(objects))
            else:
                ref.update(ann_id=objects[0], category_id=1)
            refs.append(ref)
            sent_id, written = sent_id + n, written + n
    root.mkdir(parents=True, exist_ok=True)
    (root / "instances.json").write_text(json.dumps({  # json.dumps: C-encoded, json.dump is not
        "info": {"description": "generated"}, "images": coco_images, "licenses": [{"id": 1}],
        "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}), encoding="utf-8")
    if grefcoco:
        (root / "grefs(unc).json").write_text(json.dumps(refs), encoding="utf-8")
    else:
        (root / "refs(unc).p").write_bytes(pickle.dumps(refs))
    return root


def _annotation(rng: random.Random, ann_id: int, image_id: int, width: int, height: int) -> dict:
    """A COCO annotation: a polygon around a random centre (and sometimes a second part), or a crowd column RLE."""
    x0, y0 = rng.uniform(40, width - 40), rng.uniform(40, height - 40)
    if ann_id % 25 == 0:
        column = int(x0)
        segmentation = {"size": [height, width], "counts": [column * height, height, (width - column - 1) * height]}
        return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 1, "segmentation": segmentation,
                "area": float(height), "bbox": [float(column), 0.0, 1.0, float(height)]}
    parts = []
    for _ in range(1 if ann_id % 7 else 2):
        points = rng.randint(8, 40)
        radius = rng.uniform(5, 40)
        parts.append([round(v + rng.uniform(-radius, radius), 2) for _ in range(points) for v in (x0, y0)])
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "segmentation": parts,
            "area": round(rng.uniform(100, 5000), 4), "bbox": [round(x0 - 40, 2), round(y0 - 40, 2), 80.0, 80.0]}


def _sentence(text: str, sent_id: int) -> dict:
    return {"sent_id": sent_id, "sent": text, "raw": text, "tokens": text.split()}


# ---------------------------------------------------------------------------------------------------- the reference


def prepare_in_memory(data, output, split: str | None = None, images=None, seed: int = 0, repeats: int = 1,
                      split_by: str = "unc") -> int:
    """Write what `stamp-hf prepare-data` writes for a LLaVA file or a REFER / gRefCOCO folder (well-formed input,
    pickles allowed), the input read whole and every record held before writing. Returns the record count."""
    data, output = Path(data), Path(output)
    folder = output.parent.resolve()
    if data.is_file():
        records = _llava_records(data, Path(images) if images else data.parent, folder)
    else:
        records = _reference_records(data, split, split_by, Path(images) if images else data, folder, seed, repeats)
    with output.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(records)


def _relative(image: Path, folder: Path) -> str:
    image = image.resolve()
    return image.relative_to(folder).as_posix() if image.is_relative_to(folder) else str(image)


def _llava_records(path: Path, image_root: Path, folder: Path) -> list[dict]:
    records = []
    for number, sample in enumerate(json.loads(path.read_text(encoding="utf-8"))):
        if "image" not in sample:
            continue
        messages = [{"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]} for turn in sample["conversations"]]
        first = next(m for m in messages if m["role"] == "user")
        first["content"] = first["content"].replace(IMAGE_MARKER, "").strip()
        records.append({"id": str(sample.get("id", number)), "image": _relative(image_root / sample["image"], folder),
                        "messages": messages})
    return records


def _reference_records(root: Path, split: str, split_by: str, image_root: Path, folder: Path, seed: int,
                       repeats: int) -> list[dict]:
    refs_file = root / f"grefs({split_by}).json"
    refs = (json.loads(refs_file.read_text(encoding="utf-8")) if refs_file.exists()
            else pickle.loads((root / f"refs({split_by}).p").read_bytes()))
    coco = json.loads((root / "instances.json").read_text(encoding="utf-8"))
    annotations = {a["id"]: a for a in coco["annotations"]}
    coco_images = {i["id"]: i for i in coco["images"]}
    rng, records = random.Random(seed), []
    for ref in refs:
        if ref["split"] != split:
            continue
        info = coco_images[ref["image_id"]]
        size = (info["width"], info["height"])
        ann_ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
        masks = [{"empty": True} if ref.get("no_target") else
                 _union([annotations[i]["segmentation"] for i in ann_ids if i != -1], size)]
        image = _relative(image_root / info["file_name"], folder)
        for sentence in ref["sentences"]:
            for repeat in range(repeats):
                question = rng.choice(RES_QUESTIONS).format(sentence["sent"])
                answer = rng.choice(RES_ANSWERS).format(sentence["sent"])
                record_id = f"{ref['ref_id']}_{sentence['sent_id']}" + (f"_{repeat}" if repeats > 1 else "")
                records.append({"id": record_id, "image": image, "messages": [
                    {"role": "user", "content": question}, {"role": "assistant", "content": answer}], "masks": masks})
    return records


def _union(segmentations: list, size: tuple[int, int]) -> dict:
    """COCO segmentations (polygon parts under 3 points dropped) as one compressed RLE of their union."""
    from pycocotools import mask as mask_utils

    specs = [{"polygons": [p for p in s if len(p) >= 6]} if isinstance(s, list) else {"rle": s} for s in segmentations]
    rles = [mask_rle(spec, size, "reference") for spec in specs]
    rle = rles[0] if len(rles) == 1 else mask_utils.merge(rles, intersect=False)
    return {"rle": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}}


# ---------------------------------------------------------------------------------------------------- measuring


# run first in the child: at exit, its own peak resident memory (VmHWM: the high-water mark of the memory of this
# program, not of the parent it was forked from, which ru_maxrss would also count) as the last line of stderr
REPORT_PEAK = """
import atexit, sys
def _report_peak():
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    print("peak-rss-kib", kib, file=sys.stderr)
atexit.register(_report_peak)
"""


def peak_rss_mib(*codes: str, env: dict | None = None) -> list[tuple[int, str, float]]:
    """Run each Python code in a child process, all at once; for each, its exit status, its stderr and its peak
    resident memory in MiB (Linux)."""
    children = [subprocess.Popen([sys.executable, "-c", REPORT_PEAK + code], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, env=env) for code in codes]
    results = []
    for child in children:
        _, stderr = child.communicate()
        err, _, peak = stderr.rstrip("\n").rpartition("\n")
        label, kib = peak.split() if peak.startswith("peak-rss-kib") else ("", "nan")
        results.append((child.returncode, err if label else stderr, float(kib) / 1024))
    return results
