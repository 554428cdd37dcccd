"""The JSON Lines training format, its Dataset and its collator.

One record per image::

    {"image": "images/000001.png",
     "messages": [{"role": "user", "content": "Please segment the small blue triangle."},
                  {"role": "assistant", "content": "Sure, it is <|seg|>."}],
     "masks": [{"png": "masks/000001_0.png"}]}

Paths are relative to the .jsonl file (or absolute). `masks` holds one mask per `<|seg|>` of the assistant turns, in
order, each `{"png": path}` (nonzero = foreground, image size), `{"polygons": [[x0, y0, x1, y1, ...], ...]}` (COCO
polygons in pixels), `{"rle": {"size": [h, w], "counts": ...}}` (COCO RLE) or `{"empty": true}`; `[]` or absent for
VQA records. An assistant message may carry a `"kind"` string of its own (e.g. the question's kind, "count"): training
ignores it, `stamp-hf eval` breaks VQA exact match down by it. The image goes at the start of the first user turn.
`<|seg|>` in assistant turns is the control token; control tokens typed in user or system turns stay text.
"""

import json
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .coco_masks import mask_rle, pycocotools_mask
from .configuration_stamp import MASK_LOSS_RESOLUTIONS
from .modeling_stamp import area_fractions
from .processing_stamp import IGNORE_INDEX, load_image, user_turn

SEG_TOKEN = "<|seg|>"


@dataclass
class Record:
    """One line of a .jsonl file, resolved: the image path, the conversation and the mask specifications."""

    image: Path
    messages: list[dict]
    masks: list[dict]
    root: Path  # the folder relative paths start from
    where: str  # "file.jsonl:line", for error messages

    def load_image(self) -> Image.Image:
        """The record's image as RGB, through the one image loader, in its stored orientation (the masks' own)."""
        try:
            return load_image(self.image, upright=False)
        except (OSError, ValueError) as error:
            raise type(error)(f"{self.where}: {error}") from None

    def load_masks(self, size: tuple[int, int]) -> list[np.ndarray]:
        """The ground-truth masks as boolean (height, width) arrays; `size` is the image's (width, height)."""
        return [load_mask(spec, size, self.root, f"{self.where} mask {k}") for k, spec in enumerate(self.masks)]

    def check(self) -> None:
        """Read the image and every mask as a sample of it would (readable, of the image's size): the errors of
        `__getitem__` up front, `file:line` first."""
        self.load_masks(self.load_image().size)


def read_records(path) -> list[Record]:
    """Parse and check a .jsonl file: every line a record, every `<|seg|>` with its mask. Errors name file and line.
    All records are held in memory: for large files `STAMPDataset` indexes the file instead."""
    path = _data_file(path)
    records = [_parse_line(line, path, number) for number, line in _record_lines(path)]
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _data_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    return path


def _record_lines(path: Path, offsets: bool = False):
    """(line number, line) of every non-blank line; with `offsets`, (line number, byte offset, line bytes)."""
    with path.open("rb") as lines:
        offset = 0
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield (number, offset, line) if offsets else (number, line)
            offset += len(line)


def _parse_line(line: bytes, path: Path, number: int) -> Record:
    where = f"{path}:{number}"
    return _record(_checked_line(line, where), path.parent, where)


def _checked_line(line: bytes, where: str) -> dict:
    """The JSON of one line, checked to be a record of the format (every `<|seg|>` with its mask)."""
    try:
        raw = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{where}: not valid JSON ({getattr(error, 'msg', error)})") from None
    if not isinstance(raw, dict) or "image" not in raw or "messages" not in raw:
        raise ValueError(f"{where}: a record needs 'image' and 'messages'")
    messages = raw["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: each message needs a role of 'system', 'user' or 'assistant'")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message content must be a string")
        if not isinstance(message.get("kind", ""), str):  # an optional tag of the turn (stamp-hf eval groups by it)
            raise ValueError(f"{where}: a message's 'kind' must be a string, got {message['kind']!r}")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError(f"{where}: the conversation has no user turn to put the image in")
    masks = raw.get("masks") or []
    segs = sum(m["content"].count(SEG_TOKEN) for m in messages if m["role"] == "assistant")
    if segs != len(masks):
        raise ValueError(f"{where}: {segs} {SEG_TOKEN} in the assistant turns but {len(masks)} masks")
    return raw


def _record(raw: dict, root: Path, where: str) -> Record:
    image = Path(raw["image"])
    image = image if image.is_absolute() else root / image
    return Record(image=image, messages=raw["messages"], masks=raw.get("masks") or [], root=root, where=where)


def load_mask(spec: dict, size: tuple[int, int], root: Path, where: str) -> np.ndarray:
    """One MASK of the format as a boolean (height, width) array for an image of `size` = (width, height)."""
    width, height = size
    if not isinstance(spec, dict) or len(spec.keys() & {"png", "polygons", "rle", "empty"}) != 1:
        raise ValueError(f"{where}: a mask is one of {{'png': ...}}, {{'polygons': ...}}, {{'rle': ...}}, {{'empty': true}}")
    if "empty" in spec:
        return np.zeros((height, width), dtype=bool)
    if "png" in spec:
        file = Path(spec["png"])
        file = file if file.is_absolute() else root / file
        try:
            with Image.open(file) as png:
                mask = np.asarray(png.convert("L")) != 0
        except OSError as error:
            raise OSError(f"{where}: cannot read mask {file}: {error}") from None
        if mask.shape != (height, width):
            raise ValueError(
                f"{where}: mask {file} is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}"
            )
        return mask
    return pycocotools_mask(where).decode(mask_rle(spec, size, where)).astype(bool)


# ---------------------------------------------------------------------------------------------------- encoding


def record_chat(image: Image.Image, messages: list[dict]) -> list[dict]:
    """A record's messages as a chat for `STAMPProcessor.encode_chat`: the image at the start of the first user turn
    (the one message builder, `user_turn`), the other turns as they are."""
    chat, image_placed = [], False
    for message in messages:
        if message["role"] == "user" and not image_placed:
            message, image_placed = user_turn([image], message["content"]), True
        chat.append(message)
    return chat


def encode_record(processor, image: Image.Image, messages: list[dict]) -> dict:
    """One training sample without its masks: `processor.encode_chat(labels=True)` of the record's chat, as the 1-D
    input_ids / labels / mm_token_type_ids, pixel_values and image_grid_thw the collator pads."""
    inputs, _ = processor.encode_chat(record_chat(image, messages), labels=True)
    item = {key: inputs[key][0] for key in ("input_ids", "labels", "mm_token_type_ids")}
    return {**item, "pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}


# ---------------------------------------------------------------------------------------------------- dataset


class STAMPDataset(torch.utils.data.Dataset):
    """
    One or more .jsonl files of the training format, encoded on access: each item is what `STAMPModel.forward` takes
    for one sample, with `mask_labels` already at the resolution the loss is computed at ((num_seg, h, w), each cell's
    foreground fraction; the model thresholds it at 0.5 unless its config says `soft_mask_labels`):
    `mask_loss_resolution` "patch" puts them on the image's patch grid, "image" on the pixels of the image the model
    sees (the processor's resize of it), so items stay small whatever the size of the original image.

    `repeats`: how many times each file's records are in the data set (one per file; default once each), the way the
    released training mixes its sources (referring data x 3 with LLaVA x 1).

    The files are read lazily: construction makes one pass that checks every line (valid JSON, a record, one mask per
    `<|seg|>`; errors name file:line) and keeps only each record's byte offset and line number (16 bytes a record);
    an item's line is read, parsed and its masks decoded in `__getitem__`. Checked only on access:
    that the image and PNG masks can be read and have matching sizes, and that RLE sizes match the image.
    """

    def __init__(self, path, processor, mask_loss_resolution: str = "patch", repeats=None):
        if mask_loss_resolution not in MASK_LOSS_RESOLUTIONS:
            raise ValueError(f"mask_loss_resolution must be one of {MASK_LOSS_RESOLUTIONS}, got {mask_loss_resolution!r}")
        several = isinstance(path, (list, tuple))
        self.files = [_data_file(p) for p in (path if several else [path])]
        if not self.files:
            raise ValueError("no data files given")
        repeats = [1] * len(self.files) if repeats is None else list(repeats)
        if len(repeats) != len(self.files) or not all(type(r) is int and r >= 1 for r in repeats):
            raise ValueError(f"repeats must be one whole number >= 1 per data file ({len(self.files)}), got {repeats}")
        self.path = self.files if several else self.files[0]
        self._indexes = [_index_file(file) for file in self.files]  # one copy per file: a repeat reads it again
        self._file_starts = np.cumsum([0] + [len(offsets) * times for (offsets, _), times in zip(self._indexes, repeats)])
        self.processor = processor
        self.mask_loss_resolution = mask_loss_resolution

    def __len__(self):
        return int(self._file_starts[-1])

    def record(self, index) -> Record:
        """The parsed record at `index` (read from its file now)."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range ({len(self)} records)")
        number = int(np.searchsorted(self._file_starts, index, side="right")) - 1
        offsets, line_numbers = self._indexes[number]
        local = (index - int(self._file_starts[number])) % len(offsets)
        with self.files[number].open("rb") as lines:
            lines.seek(int(offsets[local]))
            return _parse_line(lines.readline(), self.files[number], int(line_numbers[local]))

    def __getitem__(self, index) -> dict:
        record = self.record(index)
        image = record.load_image()
        masks = record.load_masks(image.size)
        try:
            item = encode_record(self.processor, image, record.messages)
        except ValueError as error:
            raise ValueError(f"{record.where}: {error}") from None
        size = self.processor.mask_grid(item["image_grid_thw"][0])
        if self.mask_loss_resolution == "image":
            cell = self.processor.patch_factor(self.processor.image_processor)
            size = (size[0] * cell, size[1] * cell)
        fractions = [area_fractions(torch.from_numpy(m), size) for m in masks]
        item["mask_labels"] = torch.stack(fractions) if fractions else torch.zeros(0, *size)
        return item


def _index_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and line numbers of the records of a .jsonl file, every line checked on the way (not kept)."""
    offsets, numbers = array("q"), array("q")
    for number, offset, line in _record_lines(path, offsets=True):
        _checked_line(line, f"{path}:{number}")
        offsets.append(offset)
        numbers.append(number)
    if not offsets:
        raise ValueError(f"{path}: no records")
    return np.frombuffer(offsets, dtype=np.int64), np.frombuffer(numbers, dtype=np.int64)


class STAMPCollator:
    """Pads a list of `STAMPDataset` items into one batch (right padding); images of any sizes are concatenated as
    Qwen2-VL takes them (pixel_values rows + one image_grid_thw row per image); mask_labels stay one tensor per sample."""

    def __init__(self, processor):
        self.pad_token_id = processor.tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before training")

    def __call__(self, items: list[dict]) -> dict:
        length = max(len(item["input_ids"]) for item in items)

        def pad(key, value):
            return torch.stack([torch.nn.functional.pad(i[key], (0, length - len(i[key])), value=value) for i in items])

        return {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": torch.stack(
                [torch.arange(length) < len(item["input_ids"]) for item in items]
            ).long(),
            "labels": pad("labels", IGNORE_INDEX),
            "mm_token_type_ids": pad("mm_token_type_ids", 0),
            "pixel_values": torch.cat([item["pixel_values"] for item in items]),
            "image_grid_thw": torch.cat([item["image_grid_thw"] for item in items]),
            "mask_labels": [item["mask_labels"] for item in items],
        }


__all__ = ["IGNORE_INDEX", "Record", "STAMPCollator", "STAMPDataset", "encode_record", "load_mask", "mask_rle", "read_records", "record_chat"]
