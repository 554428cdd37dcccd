"""Lower precision on the CPU: float32, bfloat16, and int8 weight-only quantization of the language model (torchao
through transformers' TorchAoConfig), side by side.

1. Latency of one generate_with_masks request at speed.py's shapes (Qwen2-VL-2B layer shapes, reduced depth, random
   weights, N = 1024, an answer forced to one `<|seg|>`), median of alternating rounds.
2. On the demo model (demo_model/), over --samples demo samples (stamp_hf.synthetic, test split): latency per
   request, how often the answer text equals float32's, and the IoU of each mask with float32's (at image size; a
   mask float32 has and the other lacks counts as IoU 0; two empty masks as 1).
3. For every precision, generate_with_masks against predict_masks (teacher-forced, no cache) on the same answers: the
   largest logit difference, checked against the tolerance stated in STAMP_TOLERANCES.

Run: .venv/bin/python benchmarks/precision.py [--samples 20] [--repeats 3] [--text-layers 1] [--vision-layers 1]
     [--json benchmarks/results/precision_cpu.json]      (needs the `quant` extra: pip install -e ".[quant]")
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import stamp_hf  # noqa: F401  (registers STAMP with the Auto classes)

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("float32", "bfloat16", "int8")
# generate_with_masks vs predict_masks, largest |logit difference| allowed (the two paths order the same sums
# differently; bfloat16 rounds each activation to 8 bits of mantissa)
STAMP_TOLERANCES = {"float32": 1e-4, "bfloat16": 0.25, "int8": 1e-4}


def load(folder, precision):
    """The STAMP model in `folder` at `precision`: float32; bfloat16 (every weight); or int8 weight-only for the
    language model's linear layers (vision tower, classifier, embeddings and vocabulary head stay float32)."""
    from transformers import AutoModel

    if precision == "int8":
        from stamp_hf.quantization import int8_language_model_config

        return AutoModel.from_pretrained(folder, quantization_config=int8_language_model_config()).eval()
    return AutoModel.from_pretrained(folder, dtype=getattr(torch, precision)).eval()


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def shapes_latency(args):
    """generate_with_masks at Qwen2-VL-2B layer shapes, one model per precision, alternating rounds."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed import qwen2_vl_2b_config, request

    from stamp_hf import STAMPModel
    from stamp_hf.testing import ForceTokens, tiny_processor, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = STAMPModel(qwen2_vl_2b_config(tokenizer, args.text_layers, args.vision_layers)).eval()
    processor = tiny_processor(tokenizer, 256, 1280)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        del model
        models = {precision: load(folder, precision) for precision in PRECISIONS}
    inputs, answer = request(models["float32"], processor, 1024, 1, "cpu")
    force = [ForceTokens(answer, inputs["input_ids"].shape[1])]

    def call(precision):
        model = models[precision]
        batch = dict(inputs, pixel_values=inputs["pixel_values"].to(model.dtype))
        return lambda: model.generate_with_masks(**batch, max_new_tokens=len(answer), logits_processor=force)

    calls = {precision: call(precision) for precision in PRECISIONS}
    times = {precision: [] for precision in PRECISIONS}
    with torch.no_grad():
        for fn in calls.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for precision, fn in calls.items():
                times[precision] += timed(fn, 1)
    rows = {p: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)} for p, t in times.items()}
    base = rows["float32"]["median_s"]
    print(f"generate_with_masks at Qwen2-VL-2B layer shapes ({args.text_layers} text / {args.vision_layers} vision "
          "layers), N = 1024, 1 <|seg|>, median of", args.repeats, "alternating rounds:")
    for precision, row in rows.items():
        print(f"  {precision:<9} {row['median_s']:.2f} s ({row['min_s']:.2f}-{row['max_s']:.2f}), "
              f"x{base / row['median_s']:.2f} vs float32")
    return rows


def demo_samples(count):
    from stamp_hf.synthetic.scenes import make_sample, split_seeds

    return [make_sample(seed) for seed in split_seeds("test", count)]


def iou(a, b):
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


@torch.no_grad()
def demo_agreement(args):
    """Answers and masks of each precision on the demo samples, against float32's; latency per request."""
    from transformers import AutoProcessor

    folder = str(ROOT / "demo_model")
    processor = AutoProcessor.from_pretrained(folder)
    samples = demo_samples(args.samples)
    results, report = {}, {}
    for precision in PRECISIONS:
        model = load(folder, precision)
        answers, seconds, differences = [], [], []
        for sample in samples:
            messages = [{"role": "user", "content": [{"type": "image", "image": sample.image},
                                                     {"type": "text", "text": sample.messages[0]["content"]}]}]
            inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            start = time.perf_counter()
            out = model.generate_with_masks(**inputs, max_new_tokens=24)
            masks = processor.post_process_masks(out, [(sample.image.height, sample.image.width)])[0]
            seconds.append(time.perf_counter() - start)
            text = processor.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)
            answers.append((text, [m.numpy() for m in masks]))
            if out.seg_positions[0]:
                differences.append(generate_vs_predict(model, inputs, out))
        results[precision] = answers
        report[precision] = {"median_request_s": statistics.median(seconds),
                             "max_generate_vs_predict": max(differences, default=0.0),
                             "tolerance": STAMP_TOLERANCES[precision]}
        del model
    for precision in PRECISIONS:
        same_text, ious = 0, []
        for (text, masks), (ref_text, ref_masks) in zip(results[precision], results["float32"]):
            same_text += text == ref_text
            for k, ref in enumerate(ref_masks):
                ious.append(iou(masks[k], ref) if k < len(masks) else 0.0)
        report[precision].update(same_text=same_text, samples=len(samples), masks=len(ious),
                                 mean_iou=statistics.mean(ious) if ious else None, min_iou=min(ious, default=None))
    print(f"\ndemo model over {len(samples)} test-split samples (greedy, own answers), against float32:")
    for precision, row in report.items():
        verdict = "within" if row["max_generate_vs_predict"] <= row["tolerance"] else "OVER"
        print(f"  {precision:<9} {row['median_request_s'] * 1e3:6.1f} ms per request; same answer "
              f"{row['same_text']}/{row['samples']}; mask IoU mean {row['mean_iou']:.4f} min {row['min_iou']:.4f} over "
              f"{row['masks']} masks; generate_with_masks vs predict_masks max |diff| "
              f"{row['max_generate_vs_predict']:.2e} ({verdict} {row['tolerance']:g})")
    return report


def generate_vs_predict(model, inputs, out) -> float:
    """Largest |logit| difference between phase 2 on the cache and the teacher-forced pass on the same sequence."""
    teacher = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    teacher["input_ids"] = out.sequences
    teacher["attention_mask"] = torch.ones_like(out.sequences)
    predicted = model.predict_masks(**teacher)[0]
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(out.mask_logits[0], predicted, strict=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-layers", type=int, default=1)
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--skip-shapes", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/precision_cpu.json")
    args = parser.parse_args()
    print(f"precision on the CPU ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    report = {"args": vars(args), "cpu_cores": os.cpu_count()}
    report["demo"] = demo_agreement(args)
    if not args.skip_shapes:
        report["shapes"] = shapes_latency(args)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
