"""Resident memory and speed of STAMPDataset on a large JSON Lines file (what `stamp-hf prepare-data` writes for
RefCOCO*: one record per sentence, a COCO RLE mask inline, images referenced).

Generates RECORDS records (default 200k) over a few 640x480 images, then measures, in this order:
  1. the lazy dataset: index build (records/s) and the resident memory it adds (psutil RSS);
  2. random access: records/s of `dataset.record(i)` + mask decoding, and of full items (`dataset[i]`, tokenized with
     a tiny processor, mask labels on the patch grid);
  3. for comparison, `read_records` (every record parsed and held, what the dataset did before): the memory it adds.
The figures and their ratio are printed side by side; nothing is asserted.

    .venv/bin/python benchmarks/dataset_memory.py [--records 200000] [--accesses 2000] [--folder DIR]
"""

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from stamp_hf.data import STAMPDataset, read_records  # noqa: E402
from stamp_hf.prompts import RES_ANSWERS, RES_QUESTIONS  # noqa: E402

WIDTH, HEIGHT, IMAGES = 640, 480, 16
WORDS = "man woman left right red blue small large shirt car dog table chair near far front back white black".split()


def rss_mib() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def write_data(folder: Path, records: int, seed: int = 0) -> Path:
    """RECORDS records over IMAGES images, each mask an ellipse as compressed COCO RLE (a few hundred bytes)."""
    from pycocotools import mask as mask_utils

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rles = []
    for k in range(IMAGES):
        Image.fromarray(np.random.RandomState(k).randint(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(
            folder / "images" / f"{k}.jpg")
        mask = Image.new("L", (WIDTH, HEIGHT))
        x, y = rng.randrange(0, WIDTH - 200), rng.randrange(0, HEIGHT - 150)
        ImageDraw.Draw(mask).ellipse((x, y, x + rng.randrange(50, 200), y + rng.randrange(40, 150)), fill=1)
        rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
        rles.append({"size": rle["size"], "counts": rle["counts"].decode()})
    path = folder / "data.jsonl"
    with path.open("w") as out:
        for n in range(records):
            k = n % IMAGES
            sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 8)))
            record = {"id": str(n), "image": f"images/{k}.jpg", "messages": [
                {"role": "user", "content": rng.choice(RES_QUESTIONS).format(sentence)},
                {"role": "assistant", "content": rng.choice(RES_ANSWERS).format(sentence)}], "masks": [{"rle": rles[k]}]}
            out.write(json.dumps(record) + "\n")
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--accesses", type=int, default=2000, help="random records read (full items: a tenth)")
    parser.add_argument("--folder", type=Path, default=None, help="where the data goes (default: a temporary folder)")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="stamp-dataset-memory-"))

    start = time.perf_counter()
    path = write_data(folder, args.records)
    print(f"wrote {args.records} records, {path.stat().st_size / 2**20:.1f} MiB, in {time.perf_counter() - start:.1f}s "
          f"({path})")

    from stamp_hf.testing import tiny_processor

    processor = tiny_processor()
    base = rss_mib()
    start = time.perf_counter()
    dataset = STAMPDataset(path, processor)
    build = time.perf_counter() - start
    lazy = rss_mib() - base
    print(f"lazy index:    {len(dataset)} records in {build:.2f}s = {len(dataset) / build:,.0f} records/s, "
          f"+{lazy:.1f} MiB resident ({dataset._offsets.nbytes + dataset._line_numbers.nbytes} bytes of index)")

    rng = random.Random(1)
    indices = [rng.randrange(len(dataset)) for _ in range(args.accesses)]
    start = time.perf_counter()
    for i in indices:
        record = dataset.record(i)
        record.load_masks((WIDTH, HEIGHT))
    access = time.perf_counter() - start
    print(f"random access: record + mask decode {args.accesses / access:,.0f} records/s", end="; ")
    full = indices[: max(args.accesses // 10, 1)]
    start = time.perf_counter()
    for i in full:
        dataset[i]
    items = time.perf_counter() - start
    print(f"full items (image + tokens + mask labels) {len(full) / items:,.0f} items/s")
    after_access = rss_mib() - base
    print(f"               resident after the accesses: +{after_access:.1f} MiB")
    del dataset

    base = rss_mib()
    start = time.perf_counter()
    records = read_records(path)
    eager_time = time.perf_counter() - start
    eager = rss_mib() - base
    print(f"all records held (read_records): {len(records)} in {eager_time:.2f}s, +{eager:.1f} MiB resident")
    index = max(lazy, (dataset_index_bytes := 16 * len(records)) / 2**20)  # RSS moves in pages: at least the arrays
    print(f"held / lazy: {eager / index:.0f}x the memory; per record {eager * 2**20 / len(records):,.0f} B held vs "
          f"{index * 2**20 / len(records):,.0f} B indexed (index arrays {dataset_index_bytes:,} B)")
    print(f"machine: {len(os.sched_getaffinity(0))} CPUs, python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
