"""STAMP's mask pass side by side with the alternatives, and its peak memory (Qwen2-VL-2B layer shapes, random weights;
`--backbone qwen3_vl`: Qwen3-VL-2B's, with DeepStack, 32 px cells).

One model (Qwen2-VL-2B layer shapes: text hidden 1536 / MLP 8960 / 12 heads / 2 KV heads, vision 1280-dim / 16 heads;
depth reduced to --text-layers and --vision-layers), one prompt, one forced answer with 1 or 3 `<|seg|>`, images of
N = 256, 1024 and 1280 merged patches. Per `<|seg|>`, median of alternating rounds (a and d warm up once first;
b and c, the slow ones, run in the first --official-rounds / --autoregressive-rounds rounds only):

  (a) ours: generate_with_masks' phase 2 (`decode_masks` on the phase-1 cache, all `<|seg|>` in one forward);
  (b) the official procedure restated on this model (stamp_hf.testing.official.official_mask_logits): per `<|seg|>` the
      vision tower again, the cache sliced (copied) to that `<|seg|>`, one forward of its N placeholders; its logits are
      checked against (a) here;
  (c) autoregressive mask decoding (the next-token paradigm, Text4Seg-style): N tokens one by one on the cache. Its
      vocabulary head is the tiny test tokenizer's (512 rows, not Qwen2's 151,936) unless --vocab-size, so (c) is a
      lower bound;
  (d) the ideal: one plain language-model forward of N tokens on the cached prefix.

Prints b/a and a/d (medians of same-round ratios), c/a (ratio of medians) (targets: a/d <= 1.05, b/a >= 3 at
N = 1024, c/a >= 10), then the peak memory added by plain `generate`, by `generate_with_masks` and by one plain
forward of N tokens (one block's activations), each in a fresh process (target: generate_with_masks <= 1.2 x generate + one block). Writes everything to --json.

Run: .venv/bin/python benchmarks/speed.py [--text-layers 1] [--vision-layers 1] [--repeats 5] [--n 256 1024 1280]
     [--segs 1 3] [--device cpu|cuda] [--dtype float32|bfloat16] [--json benchmarks/results/speed_cpu.json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import psutil
import torch
from PIL import Image

from stamp_hf.modeling_stamp import STAMP_MODELS
from stamp_hf.testing.official import autoregressive_mask_decoding, official_mask_logits, plain_forward
from stamp_hf.testing import ForceTokens, tiny_config, tiny_processor, tiny_tokenizer

GRIDS = {256: (16, 16), 1024: (32, 32), 1280: (32, 40)}  # N -> merged patch grid (h, w)
CELL = {"qwen2_vl": 28, "qwen3_vl": 32}  # pixels per merged patch
TARGETS = {"a/d": 1.05, "b/a": 3.0, "c/a": 10.0}
# for child processes that measure memory: a fixed mmap threshold hands every large block back to the OS when freed,
# so the resident set follows the live tensors (glibc's adaptive threshold otherwise keeps freed activations resident)
MEMORY_CHILD_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")


def qwen2_vl_2b_config(tokenizer, text_layers, vision_layers, vocab_size=None, min_placeholders=256,
                       max_placeholders=1280):
    """Qwen2-VL-2B's layer shapes at the given depth (the real model: 28 text layers, 32 vision layers); the
    vocabulary is the tokenizer's unless `vocab_size` is given (Qwen2-VL's: 151,936 rows, of which the tiny
    tokenizer uses the first 512)."""
    config = tiny_config(
        tokenizer,
        hidden_size=1536,
        num_layers=text_layers,
        vision_depth=vision_layers,
        min_placeholders=min_placeholders,
        max_placeholders=max_placeholders,
    )
    config.text_config.intermediate_size = 8960
    config.text_config.num_attention_heads = 12
    config.text_config.num_key_value_heads = 2
    config.text_config.rope_parameters["mrope_section"] = [16, 24, 24]
    config.vision_config.embed_dim = 1280
    config.vision_config.num_heads = 16
    config.vision_config.mlp_ratio = 4
    if vocab_size is not None:
        config.text_config.vocab_size = vocab_size
    config._attn_implementation = "sdpa"
    return config


def qwen3_vl_2b_config(tokenizer, text_layers, vision_layers, vocab_size=None):
    """Qwen3-VL-2B's layer shapes at the given depth (the real model: 28 text layers, 24 vision layers, DeepStack
    from vision layers 5, 11, 17 into text layers 0-2): text hidden 2048 / MLP 6144 / 16 heads of 128 / 8 KV heads,
    interleaved M-RoPE [24, 20, 20]; vision 1024-dim / 16 heads / MLP 4096, 16 px patches. DeepStack keeps its
    three levels (taken from the last vision layer when the tower is cut down), so phase 2 pays for them as the real
    model does."""
    config = tiny_config(tokenizer, hidden_size=2048, num_layers=text_layers, vision_depth=vision_layers,
                         vision_embed_dim=1024, backbone="qwen3_vl", min_placeholders=256, max_placeholders=1280)
    text, vision = config.text_config, config.vision_config
    text.intermediate_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim = 6144, 16, 8, 128
    text.rope_parameters["mrope_section"] = [24, 20, 20]
    vision.num_heads, vision.intermediate_size, vision.num_position_embeddings = 16, 4096, 2304
    # the real taps when the tower is deep enough, else three of its layers (at least 3 vision layers: see main)
    vision.deepstack_visual_indexes = [5, 11, 17] if vision_layers > 17 else [0, vision_layers // 2, vision_layers - 1]
    if vocab_size is not None:
        text.vocab_size = vocab_size
    config._attn_implementation = "sdpa"
    return config


def build(args):
    tokenizer = tiny_tokenizer()
    make_config = qwen3_vl_2b_config if args.backbone == "qwen3_vl" else qwen2_vl_2b_config
    config = make_config(tokenizer, args.text_layers, args.vision_layers, args.vocab_size)
    torch.manual_seed(0)
    model = STAMP_MODELS[config.model_type](config).eval().to(args.device, getattr(torch, args.dtype))
    cell = CELL[args.backbone]
    return model, tiny_processor(tokenizer, 256, 1280, patch_size=cell // 2)


def request(model, processor, n, segs, device):
    """The prompt for an image of N merged patches and a forced answer with `segs` `<|seg|>`."""
    h, w = GRIDS[n]
    cell = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
    image = Image.new("RGB", (w * cell, h * cell), (120, 90, 200))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Please segment the cat."}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    word = processor.tokenizer.encode(" here", add_special_tokens=False)
    answer = (word + [model.config.seg_token_id]) * segs + [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return inputs, answer


def timed_rounds(calls, rounds, device, warm=()):
    """Seconds of each named call, the calls alternating within a round so that a change in machine load hits all
    alike. calls: name -> (function, how many of the first rounds it runs in). The calls in `warm` run once untimed
    first. Returns name -> list of seconds, one per round it ran in."""
    times = {name: [] for name in calls}
    for name in warm:
        calls[name][0]()
    for round_index in range(rounds):
        for name, (call, runs) in calls.items():
            if round_index >= runs:
                continue
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def summary(seconds, per):
    """Median and range per `<|seg|>` in milliseconds, and every round's figure."""
    values = [s / per * 1e3 for s in seconds]
    return {"median_ms": statistics.median(values), "min_ms": min(values), "max_ms": max(values), "ms": values}


def paired_ratio(top, bottom):
    """Median over rounds of top / bottom measured in the same round (robust to load that drifts between rounds)."""
    pairs = [t / b for t, b in zip(top["ms"], bottom["ms"])]
    return statistics.median(pairs)


@torch.no_grad()
def speed_rows(model, processor, args):
    rows = []
    hidden = model.config.text_config.hidden_size
    for n in args.n:
        for segs in args.segs:
            inputs, answer = request(model, processor, n, segs, args.device)
            prompt_len = inputs["input_ids"].shape[1]
            out = model.generate_with_masks(
                **inputs, max_new_tokens=len(answer), logits_processor=[ForceTokens(answer, prompt_len)]
            )
            sequences, cache = out.sequences, out.cache  # the cache covers all of `sequences`
            features = model.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
            assert model._patch_features(features[0]).shape[0] == n
            official = official_mask_logits(
                model, sequences, inputs["pixel_values"], inputs["image_grid_thw"], cache, prompt_len
            )
            difference = max((a - b).abs().max().item() for a, b in zip(out.mask_logits[0], official, strict=True))
            if difference > args.tolerance:
                message = f"official procedure and phase 2 differ at N={n}, {segs} <|seg|>: {difference:.2e}"
                if args.dtype == "float32":
                    raise SystemExit(message)
                print(f"WARNING: {message} (over {args.tolerance:g}; bfloat16 rounds the two orders differently)")
            length = cache.get_seq_length()
            next_position = int(model.model.get_rope_index(sequences, (sequences == model.config.image_token_id).int(),
                                                           inputs["image_grid_thw"])[0].max()) + 1
            embeds = torch.randn(1, n, hidden, device=args.device, dtype=model.dtype)
            calls = {
                "a": (lambda: model.decode_masks(sequences, cache, features, inputs["image_grid_thw"],
                                                 response_start=prompt_len), args.repeats),
                "d": (lambda: plain_forward(model, cache, embeds, next_position), args.repeats),
                "b": (lambda: official_mask_logits(model, sequences, inputs["pixel_values"], inputs["image_grid_thw"],
                                                   cache, prompt_len), args.official_rounds),
            }
            if segs == args.segs[0]:  # one N-token decode per <|seg|>, whatever their number: timed once per N
                calls["c"] = (lambda: autoregressive_mask_decoding(model, cache, model.config.seg_token_id,
                                                                   next_position, n), args.autoregressive_rounds)
            times = timed_rounds(calls, args.repeats, args.device, warm=("a", "d"))
            assert cache.get_seq_length() == length  # every call left the cache as it found it
            row = {"n": n, "segs": segs, "prefix": length, "max_abs_difference_official": difference}
            row.update({name: summary(times[name], segs if name in ("a", "b") else 1) for name in times})
            rows.append(row)
            print_row(row, rows)
    return rows


def ratio(row, rows, top, bottom):
    """top / bottom, paired round by round; (c), timed with the first row of the same N, over the medians."""
    pick = lambda name: (row if name in row else next(r for r in rows if r["n"] == row["n"] and name in r))[name]  # noqa: E731
    if top in row and bottom in row:
        return paired_ratio(row[top], row[bottom])
    return pick(top)["median_ms"] / pick(bottom)["median_ms"]


def print_row(row, rows):
    if len(rows) == 1:
        print(f"{'N':>5} {'<|seg|>':>7} {'prefix':>6} {'(a) ours':>15} {'(b) official':>15} {'(c) autoregr.':>15} "
              f"{'(d) ideal':>15} {'b/a':>6} {'c/a':>6} {'a/d':>6} {'max|b-a|':>9}")
    cell = lambda s: f"{s['median_ms']:.0f} ({s['min_ms']:.0f}-{s['max_ms']:.0f})"  # noqa: E731
    c = row["c"] if "c" in row else next(r for r in rows if r["n"] == row["n"] and "c" in r)["c"]
    for key, value in (("b/a", ratio(row, rows, "b", "a")), ("c/a", ratio(row, rows, "c", "a")), ("a/d", ratio(row, rows, "a", "d"))):
        row[key] = value
    print(f"{row['n']:>5} {row['segs']:>7} {row['prefix']:>6} {cell(row['a']):>15} {cell(row['b']):>15} "
          f"{cell(c):>15} {cell(row['d']):>15} {row['b/a']:>6.2f} {row['c/a']:>6.1f} {row['a/d']:>6.3f} "
          f"{row['max_abs_difference_official']:>9.1e}", flush=True)


@torch.no_grad()
def peak_memory(args, mode):
    """Bytes one call adds at its peak, after the model is loaded (`peak_added`). mode: "generate",
    "generate_with_masks", or "forward" (one plain N-token forward on the cache that generate_with_masks left: one block's activations)."""
    model, processor = build(args)
    inputs, answer = request(model, processor, args.memory_n, args.memory_segs, args.device)
    kwargs = dict(max_new_tokens=len(answer), logits_processor=[ForceTokens(answer, inputs["input_ids"].shape[1])])
    if mode == "forward":
        cache = model.generate_with_masks(**inputs, **kwargs).cache
        embeds = torch.randn(1, args.memory_n, model.config.text_config.hidden_size, device=args.device, dtype=model.dtype)
        run = lambda: plain_forward(model, cache, embeds, cache.get_seq_length())  # noqa: E731
    else:
        run = lambda: getattr(model, mode)(**inputs, **kwargs)  # noqa: E731
    return peak_added(run, args.device)


def peak_added(run, device) -> int:
    """Bytes `run()` adds at its peak over what is allocated before it: CUDA's allocator peak, or on CPU the
    resident-set peak sampled every millisecond (honest only with MALLOC_MMAP_THRESHOLD_ fixed at process start, so
    that freed blocks go back to the OS: run it in a child process started with it, as `memory_figures` does)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    process, peak, done = psutil.Process(os.getpid()), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    base = process.memory_info().rss
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return peak[0] - base


def memory_figures(args):
    peaks = {}
    for mode in ("generate", "generate_with_masks", "forward"):
        command = [sys.executable, __file__, "--memory-only", mode] + [
            item for key in ("backbone", "text_layers", "vision_layers", "device", "dtype", "memory_n", "memory_segs",
                             "vocab_size")
            if getattr(args, key) is not None
            for item in (f"--{key.replace('_', '-')}", str(getattr(args, key)))
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=True, env=MEMORY_CHILD_ENV)
        peaks[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    mib = {mode: value / 2**20 for mode, value in peaks.items()}
    bound = 1.2 * mib["generate"] + mib["forward"]
    print(f"peak memory added (N={args.memory_n}, {args.memory_segs} <|seg|>): generate {mib['generate']:.0f} MiB, "
          f"generate_with_masks {mib['generate_with_masks']:.0f} MiB (ratio {mib['generate_with_masks'] / mib['generate']:.2f}), "
          f"one plain N-token forward {mib['forward']:.0f} MiB; bound 1.2 x generate + one block = {bound:.0f} MiB: "
          f"{'met' if mib['generate_with_masks'] <= bound else 'NOT met'}")
    return {"mib": mib, "bound_mib": bound, "n": args.memory_n, "segs": args.memory_segs}


def machine(args):
    if args.device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="qwen2_vl", choices=sorted(CELL), help="2B layer shapes of this backbone")
    parser.add_argument("--text-layers", type=int, default=1)
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of (a) and (d)")
    parser.add_argument("--official-rounds", type=int, default=3, help="of those, rounds that also run (b)")
    parser.add_argument("--autoregressive-rounds", type=int, default=1, help="rounds that also run (c), the slowest")
    parser.add_argument("--n", type=int, nargs="+", default=[256, 1024, 1280], choices=sorted(GRIDS))
    parser.add_argument("--segs", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--vocab-size", type=int, default=None, help="embedding rows (default: the tiny tokenizer's 512)")
    parser.add_argument("--tolerance", type=float, default=None, help="max |official - ours| (default 1e-4; bf16: 0.5, a warning)")
    parser.add_argument("--memory-n", type=int, default=1024, choices=sorted(GRIDS))
    parser.add_argument("--memory-segs", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/speed_cpu.json")
    parser.add_argument("--memory-only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_only:  # child process: one measurement, a fresh peak
        print(json.dumps(peak_memory(args, args.memory_only)))
        return
    if args.backbone == "qwen3_vl" and args.vision_layers < 3:
        args.vision_layers = 3  # DeepStack's three levels come from three distinct vision layers
    if args.tolerance is None:
        args.tolerance = 1e-4 if args.dtype == "float32" else 0.5

    real = {"qwen2_vl": ("Qwen2-VL-2B", "28 / 32"), "qwen3_vl": ("Qwen3-VL-2B", "28 / 24")}[args.backbone]
    print(f"STAMP mask pass at {real[0]} layer shapes, {args.text_layers} text / {args.vision_layers} vision layers "
          f"(the real model: {real[1]}), random weights, {args.dtype}, sdpa; {machine(args)}")
    print(f"times per <|seg|>: median (min-max) ms over alternating rounds: (a), (d) {args.repeats}, (b) "
          f"{args.official_rounds}, (c) {args.autoregressive_rounds}; b/a and a/d: median of same-round ratios")
    model, processor = build(args)
    rows = speed_rows(model, processor, args)
    del model
    memory = None if args.skip_memory else memory_figures(args)
    for row in rows:
        checks = [f"a/d {row['a/d']:.3f} <= {TARGETS['a/d']}", f"c/a {row['c/a']:.1f} >= {TARGETS['c/a']}"]
        if row["n"] == 1024:
            checks.append(f"b/a {row['b/a']:.2f} >= {TARGETS['b/a']}")
        verdicts = ["met" if (holds(check)) else "NOT met" for check in checks]
        print(f"N={row['n']}, {row['segs']} <|seg|>: " + "; ".join(f"{c}: {v}" for c, v in zip(checks, verdicts)))
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"machine": machine(args), "args": {k: v for k, v in vars(args).items() if k != "memory_only"},
                   "rows": rows, "memory": memory}, handle, indent=1)
    print(f"wrote {args.json}")


def holds(check: str) -> bool:
    """'name value <= target' -> whether it holds."""
    _, value, op, target = check.split()
    return float(value) <= float(target) if op == "<=" else float(value) >= float(target)


if __name__ == "__main__":
    main()
