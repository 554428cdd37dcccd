"""Phase-2 cost of STAMP at Qwen2-VL-2B layer shapes (reduced depth, random weights).

Prints:
  * phase-2 time per <|seg|> / one plain language-model forward of N tokens on the same cached prefix (target <= 1.10),
    for responses with 1 and 3 <|seg|> (3 go through one forward);
  * peak memory of generate_with_masks vs plain generate on the same prompt and response.

Run: .venv/bin/python benchmarks/phase2_overhead.py [--text-layers 4] [--vision-layers 2] [--repeats 5] [--device cpu]
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import psutil

import torch
from PIL import Image

from stamp_hf import STAMPModel
from stamp_hf.testing import ForceTokens, tiny_config, tiny_processor, tiny_tokenizer


def build(args):
    """Qwen2-VL-2B shapes: text hidden 1536 / MLP 8960 / 12 heads / 2 KV heads; vision 1280-dim, 16 heads."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(
        tokenizer,
        hidden_size=1536,
        num_layers=args.text_layers,
        vision_depth=args.vision_layers,
        min_placeholders=1024,
        max_placeholders=1280,
    )
    config.text_config.intermediate_size = 8960
    config.text_config.num_attention_heads = 12
    config.text_config.num_key_value_heads = 2
    config.text_config.rope_parameters["mrope_section"] = [16, 24, 24]
    config.vision_config.embed_dim = 1280
    config.vision_config.num_heads = 16
    config.vision_config.mlp_ratio = 4
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = STAMPModel(config).eval().to(args.device)
    processor = tiny_processor(tokenizer, 1024, 1280)
    image = Image.new("RGB", (896, 896), (120, 90, 200))  # 32 x 32 merged patches: N = 1024
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Please segment the cat."}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(args.device)
    return model, processor, inputs


def response(model, processor, segs):
    word = processor.tokenizer.encode(" here", add_special_tokens=False)
    ids = []
    for _ in range(segs):
        ids += word + [model.config.seg_token_id]
    return ids + [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def timed_pair(first, second, repeats, device):
    """Median times of two calls, run alternately so that a change in machine load hits both alike."""
    times = ([], [])
    for i in range(repeats + 1):  # the first round warms up
        for fn, bucket in zip((first, second), times):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                bucket.append(time.perf_counter() - start)
    return [sorted(bucket)[len(bucket) // 2] for bucket in times]


@torch.no_grad()
def speed(args):
    model, processor, inputs = build(args)
    prompt_len = inputs["input_ids"].shape[1]
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    n = features[0].shape[0]
    rows = []
    for segs in (1, 3):
        answer = response(model, processor, segs)
        out = model.generate_with_masks(
            **inputs, max_new_tokens=len(answer), logits_processor=[ForceTokens(answer, prompt_len)]
        )
        sequences, cache = out.sequences, out.cache  # the cache now covers all of `sequences`

        def phase2():
            model.decode_masks(
                sequences, cache, list(features), inputs["image_grid_thw"], response_start=prompt_len
            )

        def plain_forward():
            length = cache.get_seq_length()
            x = torch.randn(1, n, model.config.text_config.hidden_size, device=args.device)
            positions = (torch.arange(n, device=args.device) + length).expand(3, 1, n)
            model.model.language_model(inputs_embeds=x, position_ids=positions, cache=cache, use_cache=True)
            cache.crop(-n)

        t_phase2, t_plain = timed_pair(phase2, plain_forward, args.repeats, args.device)
        rows.append((segs, n, cache.get_seq_length(), t_phase2 / segs, t_plain, t_phase2 / segs / t_plain))
    return rows


@torch.no_grad()
def peak_memory(args, mode):
    """Peak memory added by one call (CUDA: allocator peak; CPU: resident-set peak), after the model is loaded."""
    model, processor, inputs = build(args)
    answer = response(model, processor, 3)
    kwargs = dict(max_new_tokens=len(answer), logits_processor=[ForceTokens(answer, inputs["input_ids"].shape[1])])
    run = (lambda: model.generate(**inputs, **kwargs)) if mode == "plain" else (lambda: model.generate_with_masks(**inputs, **kwargs))
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return torch.cuda.max_memory_allocated() - base
    process, peak, done = psutil.Process(os.getpid()), [0], threading.Event()

    def sample():  # resident-set peak, polled every millisecond while the call runs
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    base = process.memory_info().rss
    sampler = threading.Thread(target=sample)
    sampler.start()
    run()
    done.set()
    sampler.join()
    return peak[0] - base


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-only", choices=["plain", "masks"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_only:  # child process: one measurement, a fresh peak
        print(json.dumps(peak_memory(args, args.memory_only)))
        return

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"STAMP phase 2 at Qwen2-VL-2B shapes: {args.text_layers} text layers, {args.vision_layers} vision layers; {device_name}")
    print(f"{'<|seg|>':>8} {'N':>6} {'prefix':>7} {'phase2/seg ms':>14} {'plain fwd ms':>13} {'ratio':>6}")
    for segs, n, prefix, t2, tp, ratio in speed(args):
        print(f"{segs:>8} {n:>6} {prefix:>7} {t2 * 1e3:>14.1f} {tp * 1e3:>13.1f} {ratio:>6.3f}")

    peaks = {}
    for mode in ("plain", "masks"):
        cmd = [sys.executable, __file__, "--memory-only", mode, "--device", args.device,
               "--text-layers", str(args.text_layers), "--vision-layers", str(args.vision_layers)]
        peaks[mode] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    print(f"peak memory added by the call (3 <|seg|>): generate {peaks['plain'] / 2**20:.1f} MiB, "
          f"generate_with_masks {peaks['masks'] / 2**20:.1f} MiB, ratio {peaks['masks'] / max(peaks['plain'], 1):.2f}")


if __name__ == "__main__":
    main()
