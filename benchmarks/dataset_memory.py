"""Resident memory and speed of the training data at scale: STAMPDataset on a large JSON Lines file, and
`stamp-hf prepare-data` on paper-scale inputs.

Part "dataset": generates RECORDS records (default 200k) like what prepare-data writes for RefCOCO* (one record per
sentence, a COCO RLE mask inline, images referenced) over a few 640x480 images, then measures, in this order:
  1. the lazy dataset: index build (records/s) and the resident memory it adds (psutil RSS);
  2. random access: records/s of `dataset.record(i)` + mask decoding, and of full items (`dataset[i]`, tokenized with
     a tiny processor, mask labels on the patch grid);
  3. for comparison, `read_records` (every record parsed and held, what the dataset did before): the memory it adds.

Part "prepare": generates a LLaVA instruction file of LLAVA_SAMPLES samples (default 665k, about 1 GB as
llava_v1_5_mix665k.json) and a RefCOCO-like REFER folder of REFER_SENTENCES train sentences (default 120k, as RefCOCO's
120,624; instances.json with 10 objects an image), then runs, each in its own process, `stamp-hf prepare-data` (the
streaming readers) and the way it read before (every file loaded whole, every record held:
tests/paper_scale_data.prepare_in_memory), and prints their peak resident memory (VmHWM), time and records/s side by
side, after checking both wrote the same bytes. `--json` also writes the figures there.

Nothing is asserted.

    .venv/bin/python benchmarks/dataset_memory.py [--parts dataset prepare] [--records 200000] [--accesses 2000]
        [--llava-samples 665000] [--refer-sentences 120000] [--folder DIR] [--json benchmarks/results/FILE.json]
"""

import argparse
import filecmp
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]  # the package, and the generators / reference the tests use

from paper_scale_data import peak_rss_mib, write_llava_file, write_refer_folder  # noqa: E402
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


def measure_dataset(records_count: int, accesses: int, folder: Path) -> dict:
    from stamp_hf.data import STAMPDataset, read_records

    start = time.perf_counter()
    path = write_data(folder, records_count)
    print(f"wrote {records_count} records, {path.stat().st_size / 2**20:.1f} MiB, in "
          f"{time.perf_counter() - start:.1f}s ({path})")

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
    indices = [rng.randrange(len(dataset)) for _ in range(accesses)]
    start = time.perf_counter()
    for i in indices:
        record = dataset.record(i)
        record.load_masks((WIDTH, HEIGHT))
    access = time.perf_counter() - start
    print(f"random access: record + mask decode {accesses / access:,.0f} records/s", end="; ")
    full = indices[: max(accesses // 10, 1)]
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
    return {"records": len(records), "index_build_records_per_s": round(len(records) / build),
            "index_added_mib": round(lazy, 1), "held_added_mib": round(eager, 1)}


# timed inside the child, from just before the work to its end (the interpreter's start is not counted)
TIMED = """import time
start = time.perf_counter()
{work}
print("elapsed-s", time.perf_counter() - start, file=sys.stderr)
"""


def run_child(work: str) -> tuple[float, float]:
    """(peak resident MiB, seconds) of `work` run in a fresh Python; a failure stops the benchmark with its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), "TQDM_DISABLE": "1"}
    ((status, err, peak),) = peak_rss_mib(TIMED.format(work=work), env=env)
    if status != 0:
        raise SystemExit(f"child failed ({status}):\n{err}")
    return peak, float(err.rsplit("elapsed-s", 1)[1])


def measure_prepare(name: str, data: Path, output: Path, options: dict) -> dict:
    """prepare-data, streaming and the old whole-file way, on the same input: peak RSS, time, records/s, same bytes."""
    streamed_file = output.with_name(f"{name}_streamed.jsonl")
    in_memory_file = output.with_name(f"{name}_in_memory.jsonl")
    streamed = run_child(f"from stamp_hf.prepare import prepare_data\n"
                         f"prepare_data({str(data)!r}, {str(streamed_file)!r}, allow_pickle=True, force=True, "
                         f"progress=False, **{options!r})")
    options = {k: v for k, v in options.items() if k != "split_by"}
    in_memory = run_child(f"from paper_scale_data import prepare_in_memory\n"
                          f"prepare_in_memory({str(data)!r}, {str(in_memory_file)!r}, **{options!r})")
    records = sum(1 for _ in streamed_file.open("rb"))
    same = filecmp.cmp(streamed_file, in_memory_file, shallow=False)
    in_memory_file.unlink()
    streamed_file.unlink()
    rows = {"streaming (stamp_hf.prepare_data)": streamed, "whole files loaded, records held (before)": in_memory}
    print(f"{name}: {records:,} records; the two write the same bytes: {same}")
    print(f"  {'':44s} {'peak RSS':>10s} {'time':>8s} {'records/s':>10s}")
    for label, (peak, seconds) in rows.items():
        print(f"  {label:44s} {peak:8.0f} MiB {seconds:7.1f}s {records / seconds:10,.0f}")
    print(f"  whole-file / streaming: {in_memory[0] / streamed[0]:.1f}x the peak memory, "
          f"{in_memory[1] / streamed[1]:.2f}x the time")
    return {"records": records, "same_bytes": same,
            **{label: {"peak_rss_mib": round(peak, 1), "seconds": round(seconds, 1),
                       "records_per_s": round(records / seconds)} for label, (peak, seconds) in rows.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["dataset", "prepare"], default=["dataset", "prepare"])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--accesses", type=int, default=2000, help="random records read (full items: a tenth)")
    parser.add_argument("--llava-samples", type=int, default=665_000)
    parser.add_argument("--refer-sentences", type=int, default=120_000)
    parser.add_argument("--folder", type=Path, default=None, help="where the data goes (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="stamp-dataset-memory-"))
    results = {}
    if "dataset" in args.parts:
        results["dataset"] = measure_dataset(args.records, args.accesses, folder)
    if "prepare" in args.parts:
        start = time.perf_counter()
        llava = write_llava_file(folder / "llava" / "llava_mix.json", args.llava_samples)
        print(f"LLaVA: {args.llava_samples:,} samples, {llava.stat().st_size / 2**20:,.0f} MiB of JSON, written in "
              f"{time.perf_counter() - start:.0f}s")
        results["prepare llava"] = measure_prepare("llava", llava, folder / "out.jsonl",
                                                   {"images": str(llava.parent)})
        start = time.perf_counter()
        refer = write_refer_folder(folder / "refcoco", args.refer_sentences, image_root=folder / "train2014")
        sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:,.0f} MiB" for p in sorted(refer.iterdir()))
        print(f"REFER: {args.refer_sentences:,} train sentences ({sizes}), written in "
              f"{time.perf_counter() - start:.0f}s")
        results["prepare refer"] = measure_prepare("refer", refer, folder / "out.jsonl",
                                                   {"split": "train", "images": str(folder / "train2014")})
    machine = {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
               "python": platform.python_version()}
    print(f"machine: {machine['cpus']} CPUs, python {machine['python']}")
    if args.json:
        settings = {"parts": args.parts, **({"records": args.records} if "dataset" in args.parts else {}),
                    **({"llava_samples": args.llava_samples, "refer_sentences": args.refer_sentences}
                       if "prepare" in args.parts else {})}
        args.json.write_text(json.dumps({"machine": machine, "settings": settings, "results": results}, indent=2)
                             + "\n")


if __name__ == "__main__":
    main()
