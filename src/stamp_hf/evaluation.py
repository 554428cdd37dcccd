"""Referring-segmentation evaluation: cIoU, gIoU, gRefCOCO N-acc / T-acc, on REFER, gRefCOCO, ReasonSeg or JSONL data.

Protocol (as in LISA / GRES): the prediction for a sample is the union of the masks of every `<|seg|>` the model
writes (none: an empty mask). Per sample, I and U are pixel counts at the original image size, pixels marked "ignore"
left out. cIoU = sum(I) / sum(U) over all samples; gIoU = mean per-sample IoU, where a sample with an empty target
scores 1 if the prediction is empty too and 0 otherwise. N-acc = share of no-target samples predicted empty; T-acc =
share of target samples predicted non-empty.

Results go to OUTPUT/results.jsonl (one line per sample), OUTPUT/summary.json and OUTPUT/summary.md. A run that is
interrupted continues where it stopped; under `accelerate launch` / torchrun each process takes a share of the samples
and the main process merges the results, each sample exactly once.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from transformers import pipeline

from .data import load_mask, read_records
from .pipeline_stamp import PIPELINE_TASK
from .processing_stamp import load_image
from .prompts import REASON_SENTENCE_QUESTION, RES_QUESTIONS
from .sources import ReferAnnotation, detect_format, read_grefcoco, read_reasonseg, read_refer

RES_PROMPT = RES_QUESTIONS[0]  # Prompt S1 of the paper: "Please segment only the {} in the image."
REASON_PROMPT = REASON_SENTENCE_QUESTION  # Prompt S2, for sentence queries


@dataclass
class EvalSample:
    """One query: an image, the text of the user turn, and the target as masks of the training format (their union;
    none = no target). `ignore` masks are pixels left out of I and U."""

    id: str
    image: Path
    prompt: str
    targets: list[dict] = field(default_factory=list)
    ignore: list[dict] = field(default_factory=list)
    root: Path = Path(".")


class Refiner(Protocol):
    """A refinement step (e.g. the SAM refiners of stamp_hf.sam_stamp): the k-th mask of an answer is refined with
    seed + k, as in the pipeline, prompted as `protocol` says (sam_stamp.SAM_PROTOCOLS)."""

    def refine(self, image: Image.Image, mask: np.ndarray, seed: int = 0, protocol: str = "stamp") -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------------- metrics


def intersection_union(prediction: np.ndarray, target: np.ndarray, ignore: np.ndarray | None = None) -> tuple[int, int]:
    """Pixel counts of prediction & target and prediction | target, outside `ignore`."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in size")
    keep = ~ignore if ignore is not None else np.ones_like(target, dtype=bool)
    return int((prediction & target & keep).sum()), int(((prediction | target) & keep).sum())


def sample_scores(intersection: int, union: int, target_empty: bool, prediction_empty: bool) -> dict:
    """The per-sample numbers the summary is built from."""
    if target_empty:
        iou = 1.0 if prediction_empty else 0.0
    else:
        iou = intersection / union if union else 0.0
    return {"intersection": intersection, "union": union, "iou": iou,
            "target_empty": target_empty, "prediction_empty": prediction_empty}


def summarize(scores: list[dict]) -> dict:
    """cIoU, gIoU (in %), N-acc and T-acc (in %, None without such samples) and sample counts."""
    if not scores:
        raise ValueError("no results to summarize")
    union = sum(s["union"] for s in scores)
    no_target = [s for s in scores if s["target_empty"]]
    target = [s for s in scores if not s["target_empty"]]
    return {
        "samples": len(scores),
        "no_target_samples": len(no_target),
        "cIoU": 100 * sum(s["intersection"] for s in scores) / union if union else 100.0,
        "gIoU": 100 * sum(s["iou"] for s in scores) / len(scores),
        "N-acc": 100 * sum(s["prediction_empty"] for s in no_target) / len(no_target) if no_target else None,
        "T-acc": 100 * sum(not s["prediction_empty"] for s in target) / len(target) if target else None,
    }


def summary_table(summaries: dict[str, dict]) -> str:
    """A Markdown table, one row per variant ("STAMP", "STAMP + refinement")."""
    columns = ["samples", "cIoU", "gIoU", "N-acc", "T-acc"]
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, summary in summaries.items():
        cells = [f"{summary[c]:.2f}" if isinstance(summary[c], float) else "-" if summary[c] is None else str(summary[c])
                 for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- loaders


def load_jsonl_samples(path) -> list[EvalSample]:
    """Records of the training format: the first user turn is the query, the union of the masks is the target."""
    samples = []
    for number, record in enumerate(read_records(path)):
        prompt = next(m["content"] for m in record.messages if m["role"] == "user")
        targets = [spec for spec in record.masks if "empty" not in spec]
        samples.append(EvalSample(str(number), record.image, prompt, targets, root=record.root))
    return samples


def load_refer(
    root, split: str, split_by: str = "unc", image_root=None, allow_pickle: bool = False, prompt: str = RES_PROMPT
) -> list[EvalSample]:
    """The REFER layout (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF): `root/refs(SPLIT_BY).p` + `root/instances.json`;
    images from `image_root` (COCO train2014). One sample per referring sentence, asked as `prompt`.format(sentence)."""
    return _reference_samples(read_refer(root, split, split_by, image_root, allow_pickle), prompt)


def load_grefcoco(root, split: str, split_by: str = "unc", image_root=None, prompt: str = RES_PROMPT) -> list[EvalSample]:
    """gRefCOCO: `root/grefs(SPLIT_BY).json` + `root/instances.json`. A reference points at any number of objects
    (`ann_id` a list; `no_target` true and ann_id [-1] when nothing matches)."""
    return _reference_samples(read_grefcoco(root, split, split_by, image_root), prompt)


def _reference_samples(references: list[ReferAnnotation], prompt: str) -> list[EvalSample]:
    """One sample per sentence of each reference; the target is the union of its annotations' masks."""
    return [
        EvalSample(f"{ref.ref_id}_{sent_id}", ref.image, prompt.format(sentence), ref.targets)
        for ref in references
        for sent_id, sentence in ref.sentences
    ]


def load_reasonseg(folder, split: str | None = None) -> list[EvalSample]:
    """ReasonSeg (LISA): `folder[/split]/NAME.jpg` + `NAME.json` with {"text": [...], "is_sentence": bool, "shapes":
    [{"label": "target" | "ignore", "points": [[x, y], ...]}]}. The first text is the query, as in LISA."""
    samples = []
    for annotation in read_reasonseg(folder, split):
        template = REASON_PROMPT if annotation.is_sentence else RES_PROMPT
        samples.append(EvalSample(annotation.name, annotation.image, template.format(annotation.texts[0]),
                                  annotation.targets, annotation.ignore, root=annotation.image.parent))
    return samples


def load_samples(data, split=None, split_by="unc", image_root=None, allow_pickle=False, prompt=RES_PROMPT):
    """Pick the loader from what `data` is: a .jsonl file, a REFER folder (refs(*).p), a gRefCOCO folder
    (grefs(*).json) or a ReasonSeg folder (NAME.json + NAME.jpg, optionally in a split subfolder)."""
    kind = detect_format(data, split)
    if kind == "jsonl":
        return load_jsonl_samples(data)
    if kind == "grefcoco":
        return load_grefcoco(data, split or "val", split_by, image_root, prompt)
    if kind == "refer":
        return load_refer(data, split or "val", split_by, image_root, allow_pickle, prompt)
    if kind == "reasonseg":
        return load_reasonseg(data, split)
    raise ValueError(f"{data}: {kind} data has no referring segmentation samples to evaluate")


def _sample_masks(sample: EvalSample, size) -> tuple[np.ndarray, np.ndarray | None]:
    """Union of the target masks and of the ignore regions at `size` = (width, height)."""

    def union(specs):
        mask = np.zeros((size[1], size[0]), dtype=bool)
        for k, spec in enumerate(specs):
            mask |= load_mask(spec, size, sample.root, f"sample {sample.id} mask {k}")
        return mask

    return union(sample.targets), union(sample.ignore) if sample.ignore else None


# ---------------------------------------------------------------------------------------------------- evaluation


def evaluate(
    model,
    processor,
    samples: list[EvalSample],
    output_dir,
    run_info: dict | None = None,
    refiner: Refiner | None = None,
    max_new_tokens: int = 64,
    progress: bool = True,
    batch_size: int = 1,
    sam_protocol: str | None = None,
) -> dict:
    """
    Generate a response with masks for every sample, score it, and write results.jsonl, summary.json and
    summary.md under `output_dir`. Samples already in the results there are skipped (resume). Under several processes
    (accelerate launch / torchrun) each one takes every world_size-th remaining sample; the main process merges.

    run_info: what identifies the run (model, data, split, ...); resuming a folder written with other run_info is
    refused. It also records the post-processing (config.mask_threshold, the processor's mask_resample).
    refiner: an optional refinement step (e.g. SAM); its results are scored and summarized alongside.
    sam_protocol: how the refiner prompts SAM ("official" / "stamp"), default the processor's `sam_protocol`; the one
    used is recorded in run.json and summary.json.
    batch_size: samples generated together (left-padded); the results are those of one at a time.
    Returns {"STAMP": summary, ["STAMP + refinement": summary]}.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState(cpu=not _has_accelerator())  # cpu=True is what makes torchrun processes gloo peers on CPU
    output_dir = Path(output_dir)
    run_info = dict(run_info or {}, refine=refiner is not None, mask_threshold=model.config.mask_threshold,
                    mask_resample=processor.mask_resample)
    if refiner is not None:
        run_info["sam_protocol"] = processor.sam_protocol if sam_protocol is None else sam_protocol
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _check_run_info(output_dir / "run.json", run_info)
    state.wait_for_everyone()

    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids are not unique")
    done = _read_results(output_dir)
    remaining = [s for s in samples if s.id not in done]
    state.wait_for_everyone()  # every process has the same view of what is done before anyone writes
    mine = remaining[state.process_index :: state.num_processes]
    model = model.to(state.device).eval()
    pipe = pipeline(PIPELINE_TASK, model=model, processor=processor, device=model.device)
    part = output_dir / f"results.part{state.process_index}.{os.getpid()}.jsonl"
    with part.open("a", encoding="utf-8") as out:
        bar = tqdm(total=len(mine), desc="eval", disable=not (progress and state.is_main_process), unit="sample")
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            for record in _evaluate_batch(pipe, chunk, refiner, max_new_tokens, run_info.get("sam_protocol")):
                out.write(json.dumps(record) + "\n")
            out.flush()
            bar.update(len(chunk))
        bar.close()
    state.wait_for_everyone()

    if state.is_main_process:
        results = _read_results(output_dir)
        ordered = [results[i] for i in ids if i in results]
        if len(ordered) != len(samples):
            raise RuntimeError(f"{len(samples) - len(ordered)} samples have no result")
        temporary = output_dir / "results.jsonl.tmp"
        temporary.write_text("".join(json.dumps(r) + "\n" for r in ordered), encoding="utf-8")
        temporary.replace(output_dir / "results.jsonl")
        for leftover in output_dir.glob("results.part*.jsonl"):
            leftover.unlink()
        summaries = {"STAMP": summarize(ordered)}
        if refiner is not None:
            summaries["STAMP + refinement"] = summarize([r["refined"] for r in ordered])
        (output_dir / "summary.json").write_text(json.dumps(dict(summaries, run=run_info), indent=2))
        table = summary_table(summaries) + (
            f"\n\nMasks: logit > {run_info['mask_threshold']:g}, {run_info['mask_resample']} upsampling."
        )
        (output_dir / "summary.md").write_text(table + "\n")
        print(table)
    state.wait_for_everyone()
    summary = json.loads((output_dir / "summary.json").read_text())
    summary.pop("run")
    return summary


def _evaluate_batch(pipe, samples: list[EvalSample], refiner, max_new_tokens, sam_protocol=None) -> list[dict]:
    """One pipeline call for `samples` (a left-padded batch), each scored: STAMP's masks and, with a refiner, SAM's."""
    images = []
    for sample in samples:
        try:
            images.append(load_image(sample.image, upright=False))  # the annotations' own pixel orientation
        except (OSError, ValueError) as error:
            raise type(error)(f"sample {sample.id}: {error}") from None
    results = pipe([{"image": image, "prompt": sample.prompt} for image, sample in zip(images, samples)],
                   batch_size=len(samples), max_new_tokens=max_new_tokens, do_sample=False,
                   refine=refiner is not None, sam_model=refiner, sam_protocol=sam_protocol)
    return [_score(sample, image, result, refiner is not None) for sample, image, result in zip(samples, images, results)]


def _score(sample: EvalSample, image, result: dict, refined: bool) -> dict:
    target, ignore = _sample_masks(sample, image.size)
    coarse = "coarse_mask" if refined else "mask"  # STAMP's own masks (SAM's are "mask" when refined)
    prediction = _union([entry[coarse] for entry in result["masks"]], image.size)
    record = {"id": sample.id, "prompt": sample.prompt, "response": result["text"], "masks": len(result["masks"]),
              "labels": [entry["label"] for entry in result["masks"]],
              "scores": [round(entry["score"], 6) for entry in result["masks"]],
              **sample_scores(*intersection_union(prediction, target, ignore), not target.any(), not prediction.any())}
    if refined:
        refined_prediction = _union([entry["mask"] for entry in result["masks"]], image.size)
        record["refined"] = sample_scores(
            *intersection_union(refined_prediction, target, ignore), not target.any(), not refined_prediction.any()
        )
    return record


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _union(masks, size) -> np.ndarray:
    """The union of PIL "L" masks (the pipeline's) as one boolean (height, width) array; `size` = (width, height)."""
    prediction = np.zeros((size[1], size[0]), dtype=bool)
    for mask in masks:
        prediction |= np.asarray(mask) > 0
    return prediction


def _read_results(output_dir: Path) -> dict:
    """Results so far by sample id: the merged file, then every part file; a torn last line is ignored (redone)."""
    results = {}
    for file in [output_dir / "results.jsonl", *sorted(output_dir.glob("results.part*.jsonl"))]:
        if not file.exists():
            continue
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            results.setdefault(record["id"], record)
    return results


def _check_run_info(path: Path, run_info: dict):
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != json.loads(json.dumps(run_info)):
            raise ValueError(
                f"{path.parent} holds results of another run ({previous}); choose another output folder"
            )
    else:
        path.write_text(json.dumps(run_info, indent=2))


__all__ = [
    "EvalSample",
    "Refiner",
    "evaluate",
    "intersection_union",
    "load_grefcoco",
    "load_jsonl_samples",
    "load_reasonseg",
    "load_refer",
    "load_samples",
    "sample_scores",
    "summarize",
    "summary_table",
]
