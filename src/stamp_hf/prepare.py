"""The paper's training data from the standard datasets: REFER (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF), gRefCOCO,
ReasonSeg and LLaVA instruction data, written in the JSON Lines training format (stamp_hf.data).

- One record per referring sentence (`repeats` > 1: that many, each with its own templates), asked and answered with
  the paper's templates (stamp_hf.prompts) drawn from a generator seeded with `seed`. Records come in the order of the
  source file, so the same arguments write the same bytes.
- gRefCOCO as the official code builds it: one `<|seg|>` per sentence, its mask the union of the objects'; a
  no-target sentence gets the same kind of answer and an empty mask.
- ReasonSeg: one record per query text; the target polygons become the mask, "ignore" regions count as background
  (the training format has no ignore label).
- LLaVA: each conversation becomes a multi-turn record without masks; samples without an image are left out.
- Masks are written inline as COCO RLE at the image's size; images are referenced (relative to the output file when
  they lie under its folder, else absolute), never copied.

The sources are read by stamp_hf.sources, the readers `stamp-hf eval` uses, so a mask here decodes to the pixels the
evaluation compares against. They stream the large files, and each record is written as it is made, so memory does
not grow with the input (the 665k-sample LLaVA mix, COCO's instances.json). A progress bar (tqdm) on stderr counts the
records written and the sources read; like transformers' bars it is on by default, terminal or not (TQDM_DISABLE=1 or
progress=False turns it off).
"""

import contextlib
import json
import os
import random
from pathlib import Path

from .coco_masks import mask_rle
from .prompts import REASON_ANSWERS, REASON_QUESTIONS, REASON_SENTENCE_QUESTION, RES_ANSWERS, RES_QUESTIONS
from .sources import detect_format, read_grefcoco, read_llava, read_reasonseg, read_refer, reasonseg_size


def prepare_data(
    data,
    output,
    split: str | None = None,
    images=None,
    split_by: str = "unc",
    allow_pickle: bool = False,
    seed: int = 0,
    repeats: int = 1,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """
    Write the training records of `data` (a REFER / gRefCOCO / ReasonSeg folder or a LLaVA .json file) to `output`
    (.jsonl). `split`: the REFER / gRefCOCO split (required there, e.g. "train") or the ReasonSeg subfolder; none for
    LLaVA. `images`: the image folder (COCO train2014, saiapr_tc-12, the LLaVA image root; default: next to the data).

    Nothing is written when something is wrong (a missing image, a reference without a mask, a pickle without
    `allow_pickle`, an unknown format): the records go to a temporary file renamed to `output` at the end. An existing
    `output` is replaced only with `force`. `progress`: the bar on stderr. Returns {"format", "output", "records",
    "sources", "skipped"} (sources: the references, images or conversations read; skipped: text-only LLaVA samples).
    """
    output = Path(output)
    if output.suffix != ".jsonl":
        raise ValueError(f"{output}: the output is a JSON Lines file; name it *.jsonl")
    if output.exists() and not force:
        raise FileExistsError(f"{output} exists; pass --force (force=True) to overwrite it")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a whole number >= 1, got {repeats!r}")
    kind = detect_format(data, split)
    if kind == "jsonl":
        raise ValueError(f"{data} is already in the training format; train on it as it is")
    if kind in ("refer", "grefcoco") and not split:
        raise ValueError(f"{data}: {kind} data needs a split (--split train)")
    if kind == "llava" and split:
        raise ValueError(f"{data}: LLaVA files have no splits; leave out --split")
    rng = random.Random(seed)
    folder = output.parent.resolve()
    if kind == "refer":
        sources = read_refer(data, split, split_by, images, allow_pickle)
    elif kind == "grefcoco":
        sources = read_grefcoco(data, split, split_by, images)
    elif kind == "reasonseg":
        sources = read_reasonseg(data, split)
    else:
        sources = read_llava(data, images)
    with Progress(SOURCE_UNITS[kind], progress) as counts:
        sources = counts.read(sources)
        if kind == "reasonseg":
            records = _reasonseg_records(sources, rng, repeats, folder)
        elif kind == "llava":
            records = _llava_records(sources, folder)
        else:
            records = _reference_records(sources, rng, repeats, folder)
        written = _write_atomically(output, counts.written(records))
    return {"format": kind, "output": output, "records": written, "sources": counts.sources,
            "skipped": counts.skipped}


SOURCE_UNITS = {"refer": "references", "grefcoco": "references", "reasonseg": "images", "llava": "samples"}


class Progress:
    """What prepare_data reports: the sources read (None from a reader: a source left out, counted as skipped) and the
    records written, counted as they pass, and shown on a tqdm bar on stderr while it runs. On an error the bar is
    cleared, so the error stays the one line."""

    def __init__(self, unit: str, enabled: bool = True):
        from tqdm.auto import tqdm

        self.unit, self.sources, self.skipped = unit, 0, 0
        # disable passed only to turn the bar off, so that tqdm's own TQDM_DISABLE=1 still applies otherwise
        self.bar = tqdm(desc="prepare-data", unit=" records", **({} if enabled else {"disable": True}))

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        self.bar.leave = error_type is None
        self.bar.set_postfix_str(self.postfix(), refresh=False)
        self.bar.close()

    def read(self, sources):
        for source in sources:
            if source is None:
                self.skipped += 1
            else:
                self.sources += 1
            yield source

    def written(self, records):
        for record in records:
            yield record
            self.bar.set_postfix_str(self.postfix(), refresh=False)  # about 1 us, shown when the bar redraws
            self.bar.update()

    def postfix(self) -> str:
        skipped = f", {self.skipped} left out" if self.skipped else ""
        return f"{self.sources + self.skipped} {self.unit} read{skipped}"


# ---------------------------------------------------------------------------------------------------- records


def _reference_records(references, rng: random.Random, repeats: int, folder: Path):
    for ref in references:
        where = f"ref {ref.ref_id}"
        masks = [_union_rle(ref.targets, ref.size, where) if ref.targets else {"empty": True}]
        image = _image_reference(ref.image, folder)
        for sent_id, sentence in ref.sentences:
            for repeat in range(repeats):
                question = rng.choice(RES_QUESTIONS).format(sentence)
                answer = rng.choice(RES_ANSWERS).format(sentence)
                yield _record(_record_id(f"{ref.ref_id}_{sent_id}", repeat, repeats), image, question, answer, masks)


def _reasonseg_records(annotations, rng: random.Random, repeats: int, folder: Path):
    for annotation in annotations:
        if not annotation.targets:
            raise ValueError(f"{annotation.image.with_suffix('.json')} has no mask: no shape labelled target")
        masks = [_union_rle(annotation.targets, reasonseg_size(annotation), annotation.name)]
        image = _image_reference(annotation.image, folder)
        for number, text in enumerate(annotation.texts):
            for repeat in range(repeats):
                template = REASON_SENTENCE_QUESTION if annotation.is_sentence else rng.choice(REASON_QUESTIONS)
                answer = rng.choice(REASON_ANSWERS)
                yield _record(_record_id(f"{annotation.name}_{number}", repeat, repeats), image,
                              template.format(text), answer, masks)


def _llava_records(conversations, folder: Path):
    """None: a text-only sample, left out."""
    for conversation in conversations:
        if conversation is None:
            continue
        yield {"id": conversation.id, "image": _image_reference(conversation.image, folder),
               "messages": conversation.messages}


def _record(record_id: str, image: str, question: str, answer: str, masks: list[dict]) -> dict:
    return {"id": record_id, "image": image,
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "masks": masks}


def _record_id(base: str, repeat: int, repeats: int) -> str:
    return f"{base}_{repeat}" if repeats > 1 else base


def _union_rle(specs: list[dict], size: tuple[int, int], where: str) -> dict:
    """One compressed COCO RLE for the union of `specs` (the objects of a reference) at `size` = (width, height)."""
    from pycocotools import mask as mask_utils

    rles = [mask_rle(spec, size, f"{where} mask {k}") for k, spec in enumerate(specs)]
    rle = rles[0] if len(rles) == 1 else mask_utils.merge(rles, intersect=False)
    return {"rle": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}}


def _image_reference(image: Path, folder: Path) -> str:
    """The image path as the record stores it: relative to the output's folder when the image is inside it."""
    image = image.resolve()
    try:
        return image.relative_to(folder).as_posix()
    except ValueError:
        return str(image)


def _write_atomically(output: Path, records) -> int:
    """Write the records, as they come, to a temporary file next to `output`, then rename it; on any error nothing is
    left, not even the folders made for it."""
    made = [folder for folder in (output.parent, *output.parent.parents) if not folder.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with temporary.open("w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        if not count:
            raise ValueError("no records to write")
        temporary.replace(output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        for folder in made:  # deepest first; one someone else has put a file in stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return count


__all__ = ["prepare_data"]
