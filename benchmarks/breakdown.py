"""Where the time of one request goes, end to end, and what batching buys.

1. One `pipeline("stamp-segmentation")` call at speed.py's shapes (Qwen2-VL-2B layer shapes, reduced depth, random
   weights, a 896 x 896 image: N = 1024 by default, an answer forced to one `<|seg|>` through the generation
   config), refined with a tiny SAM (stamp_hf.testing.tiny_sam) and again without SAM, split into: image load,
   preprocessing (chat template + image processor), batching, vision tower, prefill, decode (per token), generate's own work (vocabulary head, logits
   processors, stopping), phase 2 (its language-model forward, and the rest of decode_masks), post-processing,
   SAM refinement, and what is left (the pipeline's own bookkeeping).
2. `stamp-hf segment` on the demo model (demo_model/) with --out, --overlay and a tiny SAM folder (--refine-sam), in a
   fresh process: process start and imports, model load, image read, pipeline construction, the call (split as
   above), writing the outputs.
3. Images per second through the pipeline at batch 1, 2 and 4 (different images, same prompt, same forced answer).
4. The time to an argument error (`stamp-hf segment --device banana ...`, target under 1 s; --argument-error-only
   runs just this).

Each figure is the median of --repeats calls (after one warm-up call). The split comes from timers wrapped around the
real functions and forward hooks on the vision tower and language model; nothing is changed in what runs.

Run: .venv/bin/python benchmarks/breakdown.py [--text-layers 1] [--vision-layers 1] [--repeats 3] [--batches 1 2 4]
     [--n 1024] [--json benchmarks/results/breakdown_cpu.json]
     [--device cuda --dtype bfloat16 --sam-h --vocab-size 151936]   (--sam-h: SAM ViT-H shapes, random weights)
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["image load", "preprocess", "batching", "vision tower", "prefill", "decode", "generate (rest)",
          "phase 2 forward", "phase 2 (rest)", "post-process", "SAM refinement", "pipeline (rest)"]


class Timers:
    """Seconds per stage, from wrapped functions (outermost call only) and forward hooks."""

    def __init__(self, sync=None):
        self.seconds = defaultdict(float)
        self.counts = defaultdict(int)
        self.sync = sync or (lambda: None)
        self._undo = []

    @contextlib.contextmanager
    def stage(self, name):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start
            self.counts[name] += 1

    def wrap(self, owner, attribute, name):
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            with self.stage(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)
        self._undo.append(lambda: setattr(owner, attribute, original))

    def hook_model(self, model):
        """Vision tower; language-model calls split into prefill (the first of a generate), decode and phase 2."""
        starts = {}

        def before(key):
            def hook(module, args, kwargs):
                self.sync()
                starts[key] = time.perf_counter()
            return hook

        def after(key_of):
            def hook(module, args, kwargs, output):
                self.sync()
                name = key_of(kwargs)
                self.seconds[name] += time.perf_counter() - starts.pop("lm" if name != "vision tower" else "vision")
                self.counts[name] += 1
            return hook

        def lm_stage(kwargs):
            if "stamp_layout" in kwargs:
                return "phase 2 forward"
            cache = kwargs.get("cache")
            return "prefill" if cache is None or cache.get_seq_length() == 0 or kwargs["inputs_embeds"].shape[1] > 1 else "decode"

        handles = [
            model.model.visual.register_forward_pre_hook(before("vision"), with_kwargs=True),
            model.model.visual.register_forward_hook(after(lambda kwargs: "vision tower"), with_kwargs=True),
            model.model.language_model.register_forward_pre_hook(before("lm"), with_kwargs=True),
            model.model.language_model.register_forward_hook(after(lm_stage), with_kwargs=True),
        ]
        self._undo.extend(handle.remove for handle in handles)

    def undo(self):
        for step in reversed(self._undo):
            step()
        self._undo.clear()

    def reset(self):
        self.seconds.clear()
        self.counts.clear()


def instrument_pipeline(timers, pipe, model):
    """Timers around the pipeline's stages (see STAGES); returns a function giving one call's split."""
    timers.hook_model(model)
    timers.wrap(sys.modules[type(pipe.processor).__module__], "load_chat_images", "image load")
    timers.wrap(pipe, "preprocess", "preprocess+load")
    timers.wrap(pipe, "_collate", "batching")
    timers.wrap(model, "generate", "generate")
    timers.wrap(model, "decode_masks", "decode_masks")
    timers.wrap(pipe, "postprocess", "postprocess+sam")
    original_refiner = pipe._refiner

    def refiner(source):
        found = original_refiner(source)
        if not getattr(found, "_timed", False):
            timers.wrap(found, "refine", "SAM refinement")
            found._timed = True
        return found

    pipe._refiner = refiner

    def split(total):
        s = timers.seconds
        decode_steps = max(timers.counts["decode"], 1)
        parts = {
            "image load": s["image load"],
            "preprocess": s["preprocess+load"] - s["image load"],
            "batching": s["batching"],
            "vision tower": s["vision tower"],
            "prefill": s["prefill"],
            "decode": s["decode"],
            "generate (rest)": s["generate"] - s["prefill"] - s["decode"],
            "phase 2 forward": s["phase 2 forward"],
            "phase 2 (rest)": s["decode_masks"] - s["phase 2 forward"],
            "post-process": s["postprocess+sam"] - s["SAM refinement"],
            "SAM refinement": s["SAM refinement"],
        }
        parts["pipeline (rest)"] = total - sum(parts.values())
        parts["decode per token"] = s["decode"] / decode_steps
        parts["decode steps"] = timers.counts["decode"]
        return parts

    return split


def median_split(splits):
    return {key: statistics.median(split[key] for split in splits) for key in splits[0]}


def print_split(title, split, total_key="total"):
    total = split[total_key]
    print(f"\n{title}: {total * 1e3:.0f} ms per call (median)")
    for name in [k for k in split if k not in (total_key, "decode per token", "decode steps")]:
        print(f"  {name:<28} {split[name] * 1e3:>9.1f} ms  {100 * split[name] / total:5.1f} %")
    if "decode steps" in split:
        print(f"  (decode: {split['decode steps']:.0f} steps, {split['decode per token'] * 1e3:.1f} ms per token)")


def sam_model(args):
    """(SamModel, SamProcessor): the tiny random SAM, or SAM ViT-H's shapes with random weights (--sam-h)."""
    from stamp_hf.testing import tiny_sam

    if not args.sam_h:
        model, processor = tiny_sam(seed=0)
    else:
        from transformers import SamConfig, SamModel, SamProcessor
        from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

        config = SamConfig(vision_config=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                              global_attn_indexes=[7, 15, 23, 31]))
        model, processor = SamModel(config).eval(), SamProcessor(SamImageProcessorPil())
    return model.to(args.device), processor


def build_pipeline(args):
    import torch
    from transformers import pipeline

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed import qwen2_vl_2b_config

    from stamp_hf import STAMPModel, STAMPProcessor  # noqa: F401  (registers the pipeline task)
    from stamp_hf.pipeline_stamp import PIPELINE_TASK
    from stamp_hf.testing import answer_with_masks, tiny_processor, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = qwen2_vl_2b_config(tokenizer, args.text_layers, args.vision_layers, args.vocab_size)
    torch.manual_seed(0)
    model = STAMPModel(config).eval().to(args.device, getattr(torch, args.dtype))
    processor = tiny_processor(tokenizer, 256, 1280)
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>")], pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    answer = answer_with_masks(model, processor, " it is", segs=1)
    return pipeline(PIPELINE_TASK, model=model, processor=processor, device=model.device), model, len(answer)


def images(count, n):
    """`count` different images of N merged patches (28 px each: 896 x 896 for N = 1024, 1120 x 896 for 1280)."""
    from PIL import Image

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed import GRIDS

    h, w = GRIDS[n]
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).resize((w * 28, h * 28)) for _ in range(count)]


PAPER_SECONDS = {True: 1.3, False: 0.9}  # STAMP-2B at 896 x 896 on an A800, with / without SAM (Table S3)


def pipeline_breakdown(args, pipe, model, answer_length, refine: bool):
    import torch

    from stamp_hf.sam_stamp import TransformersSamRefiner

    sync = torch.cuda.synchronize if args.device == "cuda" else None
    timers = Timers(sync)
    split_of = instrument_pipeline(timers, pipe, model)
    refiner = TransformersSamRefiner(*sam_model(args)) if refine else None
    image = images(1, args.n)[0]
    prompt = "Please segment the cat."
    splits = []
    for call in range(args.repeats + 1):
        timers.reset()
        with timers.stage("total"):
            result = pipe(image, prompt, max_new_tokens=answer_length + 2, refine=refine, sam_model=refiner)
        assert len(result["masks"]) == 1, result["text"]
        if call:  # the first call warms up
            splits.append(dict(split_of(timers.seconds["total"]), total=timers.seconds["total"]))
    timers.undo()
    split = median_split(splits)
    sam = ("SAM ViT-H shapes" if args.sam_h else "tiny SAM") if refine else "no SAM"
    print_split(f"pipeline call (N = {args.n}, 1 <|seg|>, {sam})", split)
    print(f"  latency per request {split['total']:.3f} s, per <|seg|> (phase 2) {split['phase 2 forward'] + split['phase 2 (rest)']:.3f} s"
          f"; the paper's STAMP-2B (A800, 896 x 896, {'with' if refine else 'without'} SAM): {PAPER_SECONDS[refine]} s")
    return split


def batching(args, pipe, answer_length):
    """Seconds per pipeline call at each batch size, the sizes alternating round by round (after one warm-up each)."""
    import torch

    prompt = "Please segment the cat."
    pool = images(max(args.batches), args.n)
    times = {batch: [] for batch in args.batches}
    for round_index in range(args.repeats + 1):
        for batch in args.batches:
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            results = pipe(pool[:batch], prompt, batch_size=batch, max_new_tokens=answer_length + 2)
            if args.device == "cuda":
                torch.cuda.synchronize()
            assert len(results) == batch and all(len(r["masks"]) == 1 for r in results)
            if round_index:
                times[batch].append(time.perf_counter() - start)
    rows = []
    for batch, seconds in times.items():
        median = statistics.median(seconds)
        rows.append({"batch": batch, "seconds_per_call": median, "images_per_second": batch / median,
                     "min_s": min(seconds), "max_s": max(seconds)})
    base = rows[0]["images_per_second"]
    print(f"\nimages per second through the pipeline (N = {args.n}, no SAM):")
    for row in rows:
        print(f"  batch {row['batch']}: {row['seconds_per_call']:.2f} s per call ({row['min_s']:.2f}-{row['max_s']:.2f}), "
              f"{row['images_per_second']:.3f} images/s, x{row['images_per_second'] / base:.2f} vs batch {rows[0]['batch']}")
    return rows


# ---------------------------------------------------------------------- the CLI, in a fresh process

CLI_CHILD = r'''
import json, sys, time
launched = float(sys.argv[1])
imported_at = time.time()
from stamp_hf import cli                                   # what the console script imports first
from stamp_hf.commands import _common, segment
import stamp_hf.overlay, stamp_hf.modeling_stamp, stamp_hf.pipeline_stamp, transformers.pipelines  # what run() needs
after_imports = time.time()
sys.path.insert(0, sys.argv[2])
from breakdown import Timers, instrument_pipeline

timers = Timers()
timers.wrap(stamp_hf.processing_stamp, "load_image", "image read")
timers.wrap(stamp_hf.overlay, "overlay_masks", "overlay")
original_load = segment.load

def load(args):
    with timers.stage("model load"):
        loaded = original_load(args)
    return loaded

segment.load = load
import transformers
original_pipeline = transformers.pipeline
state = {}

def pipeline(*args, **kwargs):
    with timers.stage("pipeline construction"):
        pipe = original_pipeline(*args, **kwargs)
    state["split"] = instrument_pipeline(timers, pipe, kwargs["model"])
    timers.wrap(type(pipe), "__call__", "call")  # special methods are looked up on the class
    return pipe

transformers.pipeline = pipeline
start_main = time.time()
with timers.stage("run"):
    code = cli.main(sys.argv[3:])
end = time.time()
s = timers.seconds
result = {"process start": imported_at - launched, "imports": after_imports - imported_at,
          "cli (rest)": start_main - after_imports, **{k: s[k] for k in ("image read", "model load", "pipeline construction")},
          "call": s["call"], "split": state["split"](s["call"]),
          "writing outputs": s["run"] - s["call"] - s["image read"] - s["model load"] - s["pipeline construction"],
          "overlay": s["overlay"], "exit code": code, "total": end - launched}
print("BREAKDOWN " + json.dumps(result))
'''


def cli_breakdown(args):
    """`stamp-hf segment` on the demo model, --repeats fresh processes (median of each stage)."""
    from stamp_hf.synthetic.scenes import make_sample
    from stamp_hf.testing import tiny_sam

    runs = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        sample = make_sample(0, task="refer")
        image_path = folder / "scene.png"
        sample.image.save(image_path)
        sam, sam_processor = tiny_sam(seed=0)
        sam.save_pretrained(folder / "tiny-sam")
        sam_processor.save_pretrained(folder / "tiny-sam")
        child = folder / "cli_child.py"
        child.write_text(CLI_CHILD)
        for run in range(args.repeats + 1):
            argv = ["segment", str(image_path), sample.messages[0]["content"], "--out", str(folder / f"mask{run}.png"),
                    "--overlay", str(folder / f"overlay{run}.png"), "--refine-sam", str(folder / "tiny-sam"),
                    "--device", "cpu"]
            env = dict(os.environ, HF_HUB_OFFLINE="1")
            launched = time.time()
            out = subprocess.run([sys.executable, str(child), repr(launched), str(ROOT / "benchmarks"), *argv],
                                 capture_output=True, text=True, env=env)
            line = next((l for l in out.stdout.splitlines() if l.startswith("BREAKDOWN ")), None)
            if line is None:
                raise SystemExit(f"the CLI run failed:\n{out.stderr[-3000:]}")
            if run:  # the first run warms the file cache
                runs.append(json.loads(line[len("BREAKDOWN "):]))
    flat = [{**{k: v for k, v in r.items() if k not in ("split", "exit code")},
             **{f"call: {k}": v for k, v in r["split"].items()}} for r in runs]
    split = median_split(flat)
    print(f"\nstamp-hf segment on demo_model (fresh process, --out, --overlay, --refine-sam tiny SAM): "
          f"{split['total'] * 1e3:.0f} ms wall (median of {len(runs)})")
    for key in ("process start", "imports", "cli (rest)", "image read", "model load", "pipeline construction", "call"):
        print(f"  {key:<34} {split[key] * 1e3:>9.1f} ms  {100 * split[key] / split['total']:5.1f} %")
    for key in [k for k in split if k.startswith("call: ") and k not in ("call: decode per token", "call: decode steps")]:
        print(f"    {key[6:]:<32} {split[key] * 1e3:>9.1f} ms  {100 * split[key] / split['total']:5.1f} %")
    print(f"  {'writing outputs (masks, overlay)':<34} {split['writing outputs'] * 1e3:>9.1f} ms  "
          f"{100 * split['writing outputs'] / split['total']:5.1f} %")
    return split


def time_to_argument_error(repeats: int = 3) -> dict:
    """Seconds from process start to the one-line error of `stamp-hf segment --device banana x.png ...` (median of
    `repeats` fresh processes; the target is under 1 s: the check runs before torch is imported)."""
    script = Path(sys.executable).with_name("stamp-hf")
    command = [str(script), "segment", "--device", "banana", "x.png", "Please segment the cat."]
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        seconds.append(time.perf_counter() - start)
    print(f"\ntime to an argument error ({' '.join(command[1:4])} ...): {statistics.median(seconds):.2f} s "
          f"(median of {repeats}; target < 1 s): {result.stderr.strip()}")
    return {"command": command[1:], "seconds": statistics.median(seconds), "stderr": result.stderr.strip()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-layers", type=int, default=1)
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--n", type=int, default=1024, choices=[256, 1024, 1280], help="merged patches of the image")
    parser.add_argument("--vocab-size", type=int, default=None, help="embedding rows (default: the tiny tokenizer's 512)")
    parser.add_argument("--sam-h", action="store_true", help="SAM ViT-H shapes (random weights) instead of a tiny SAM")
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--skip-batching", action="store_true")
    parser.add_argument("--argument-error-only", action="store_true",
                        help="only time a command's argument error (no model is built)")
    parser.add_argument("--json", default="benchmarks/results/breakdown_cpu.json")
    args = parser.parse_args()
    if args.argument_error_only:
        time_to_argument_error(args.repeats)
        return

    import torch

    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"STAMP request breakdown: Qwen2-VL-2B layer shapes, {args.text_layers} text / {args.vision_layers} vision "
          f"layers, random weights, {args.dtype}, sdpa; {machine}")
    pipe, model, answer_length = build_pipeline(args)
    report = {"machine": machine, "args": vars(args),
              "pipeline": pipeline_breakdown(args, pipe, model, answer_length, refine=True),
              "pipeline_without_sam": pipeline_breakdown(args, pipe, model, answer_length, refine=False)}
    if not args.skip_batching:
        report["batching"] = batching(args, pipe, answer_length)
    if not args.skip_cli:
        report["cli"] = cli_breakdown(args)
        report["argument_error"] = time_to_argument_error(args.repeats)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
