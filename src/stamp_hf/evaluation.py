"""Referring-segmentation evaluation: cIoU, gIoU, gRefCOCO N-acc / T-acc, on REFER, gRefCOCO, ReasonSeg or JSONL data.

Protocol (as in LISA / GRES): the prediction for a sample is the union of the masks of every `<|seg|>` the model
writes (none: an empty mask). Per sample, I and U are pixel counts at the original image size, pixels marked "ignore"
left out. cIoU = sum(I) / sum(U) over all samples; gIoU = mean per-sample IoU, where a sample with an empty target
scores 1 if the prediction is empty too and 0 otherwise. N-acc = share of no-target samples predicted empty; T-acc =
share of target samples predicted non-empty.

Training-format (.jsonl) records are evaluated turn by turn: each assistant turn is a sample, asked with the
conversation before it as the record gives it (earlier answers teacher-forced). A turn with `<|seg|>` is scored
against its own masks (those of its `<|seg|>`s); a turn without is a VQA sample, reported apart as the exact match of
its answer text (`normalize_answer`) and never scored as a no-target segmentation sample.

Results go to OUTPUT/results.jsonl (one line per sample), OUTPUT/summary.json and OUTPUT/summary.md. A run that is
interrupted continues where it stopped, once OUTPUT/run.json (what identifies the run) matches; a run that fails
leaves its finished samples in results.jsonl and no other file. Under `accelerate launch` / torchrun each process
takes a share of the samples and the main process merges the results, each sample exactly once.
"""

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from transformers import pipeline

from .data import SEG_TOKEN, load_mask, read_records, record_chat
from .pipeline_stamp import PIPELINE_TASK
from .processing_stamp import load_image
from .prompts import REASON_SENTENCE_QUESTION, RES_QUESTIONS
from .sources import ReferAnnotation, detect_format, read_grefcoco, read_reasonseg, read_refer

RES_PROMPT = RES_QUESTIONS[0]  # Prompt S1 of the paper: "Please segment only the {} in the image."
REASON_PROMPT = REASON_SENTENCE_QUESTION  # Prompt S2, for sentence queries


@dataclass
class EvalSample:
    """One query: an image, the text of the user turn, and the target as masks of the training format (their union;
    none = no target). `ignore` masks are pixels left out of I and U.

    `messages`: the conversation up to and including the question, in the training format (text contents; the image
    goes in the first user turn), when there is more than the one user turn `prompt`. `answer`: the reference answer
    of a VQA sample (`task` "vqa"), scored by exact match instead of masks. `where`: where the sample comes from, for
    error messages (default "sample ID"). `per_target`: for a turn with several `<|seg|>`, each one's mask (None for
    an absent target), scored one by one besides the union (the k-th predicted mask against the k-th target).
    `kind`: the assistant turn's own `kind` tag in the training format (e.g. the question's kind), by which the VQA
    summary is also broken down."""

    id: str
    image: Path
    prompt: str
    targets: list[dict] = field(default_factory=list)
    ignore: list[dict] = field(default_factory=list)
    root: Path = Path(".")
    messages: list[dict] | None = None
    task: str = "seg"
    answer: str | None = None
    where: str | None = None
    per_target: list[dict | None] | None = None
    kind: str | None = None

    def chat(self, image: Image.Image) -> list[dict]:
        """The pipeline's chat for this sample: its conversation with `image` in the first user turn."""
        return record_chat(image, self.messages or [{"role": "user", "content": self.prompt}])


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


def target_iou(prediction: np.ndarray | None, target: np.ndarray | None) -> float:
    """IoU of one `<|seg|>`'s mask with its target; an absent target (None or empty) scores 1 for an empty (or
    missing) prediction, else 0, as sample_scores scores a no-target sample."""
    prediction_empty = prediction is None or not prediction.any()
    if target is None or not target.any():
        return 1.0 if prediction_empty else 0.0
    if prediction_empty:
        return 0.0
    return sample_scores(*intersection_union(prediction, target), False, False)["iou"]


def summarize(scores: list[dict]) -> dict:
    """cIoU, gIoU (in %), N-acc and T-acc (in %, None without such samples) and sample counts; with turns of several
    `<|seg|>` (their "target_ious"): how many, the mean IoU of their targets and the share (in %) of them with every
    target at IoU >= 0.5."""
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
        **_several_target_summary([s["target_ious"] for s in scores if "target_ious" in s]),
    }


def _several_target_summary(turns: list[list[float]]) -> dict:
    if not turns:
        return {}
    ious = [iou for turn in turns for iou in turn]
    return {"several_target_samples": len(turns), "target_mIoU": 100 * sum(ious) / len(ious),
            "every_target_at_0.5": 100 * sum(min(turn) >= 0.5 for turn in turns) / len(turns)}


def normalize_answer(text: str) -> str:
    """An answer as VQA exact match compares it: lower case, runs of whitespace as one space, no leading or trailing
    whitespace, and no final `.`, `!` or `?`."""
    return re.sub(r"[.!?]+$", "", " ".join(text.lower().split())).rstrip()


def summarize_vqa(results: list[dict]) -> dict:
    """VQA samples: how many, and the share (in %) whose answer matches the reference (`normalize_answer`); when
    turns carry a `kind`, the same per kind under "by_kind" (turns without one under "-")."""
    summary = {"samples": len(results), "exact_match": 100 * sum(r["exact_match"] for r in results) / len(results)}
    if any("kind" in r for r in results):
        kinds = sorted({r.get("kind", "-") for r in results})
        summary["by_kind"] = {kind: summarize_vqa([{"exact_match": r["exact_match"]} for r in results
                                                   if r.get("kind", "-") == kind]) for kind in kinds}
    return summary


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
    """Records of the training format, turn by turn, every record checked first (its image and masks read, each mask
    of the image's size: errors name file:line). Each assistant turn is a sample with id "LINE:TURN" (the record's
    line in the file, the turn's number among the record's assistant turns from 1), asked with the messages before it
    (earlier answers as the record gives them). A turn with `<|seg|>` is a segmentation sample whose target is the
    union of its own masks (the masks of its `<|seg|>`s, in order among the record's masks); a turn without is a VQA
    sample whose reference is the turn's text; a turn with several `<|seg|>` is also scored target by target
    (`per_target`); an assistant message's optional `kind` string goes with its sample. Assistant turns before the
    first user turn (no image yet) are context only."""
    samples = []
    for record in read_records(path):
        record.check()
        line = record.where.rpartition(":")[2]
        first_user = next(k for k, m in enumerate(record.messages) if m["role"] == "user")
        masks_before, turn = 0, 0
        for k, message in enumerate(record.messages):
            if message["role"] != "assistant":
                continue
            segs = message["content"].count(SEG_TOKEN)
            if k < first_user:
                if segs:
                    raise ValueError(f"{record.where}: a {SEG_TOKEN} before the first user turn (which holds the "
                                     "image) has no image to segment")
                continue
            turn += 1
            own = record.masks[masks_before : masks_before + segs]
            masks_before += segs
            per_target = [None if "empty" in spec else spec for spec in own] if segs > 1 else None
            prompt = next(m["content"] for m in reversed(record.messages[:k]) if m["role"] == "user")
            samples.append(EvalSample(
                f"{line}:{turn}", record.image, prompt, [spec for spec in own if "empty" not in spec],
                root=record.root, messages=record.messages[:k], task="seg" if segs else "vqa",
                answer=None if segs else message["content"], where=f"{record.where} turn {turn}",
                per_target=per_target, kind=message.get("kind"),
            ))
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


def _reference_samples(references: Iterable[ReferAnnotation], prompt: str) -> list[EvalSample]:
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
            mask |= load_mask(spec, size, sample.root, f"{sample.where or f'sample {sample.id}'} mask {k}")
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
    restart: bool = False,
    device=None,
) -> dict:
    """
    Generate a response with masks for every sample, score it, and write results.jsonl, summary.json and
    summary.md under `output_dir`. Samples already in the results there are skipped (resume). Under several processes
    (accelerate launch / torchrun) each one takes every world_size-th remaining sample; the main process merges.

    run_info: what identifies the run (model, data, split, ...), kept in run.json with the first result; resuming a
    folder written with other run_info is refused, naming the first field that differs (`check_run`). It also records
    the post-processing (config.mask_threshold, the processor's mask_resample).
    restart: remove the folder's previous results first instead of resuming them.
    refiner: an optional refinement step (e.g. SAM); its results are scored and summarized alongside.
    sam_protocol: how the refiner prompts SAM ("official" / "stamp"), default the processor's `sam_protocol`; the one
    used is recorded in run.json and summary.json.
    batch_size: samples generated together (left-padded); the results are those of one at a time.
    device: where the model runs (default: the process's accelerator, else the CPU).
    A run that fails (or is interrupted) leaves its finished samples in results.jsonl (resumed by the next run) and
    no part file; one that finished none leaves no run.json, and no folder it created.
    Returns {"STAMP": summary, ["STAMP + refinement": summary], ["VQA": {"samples", "exact_match"}]}.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState(cpu=not _has_accelerator())  # cpu=True is what makes torchrun processes gloo peers on CPU
    output_dir = Path(output_dir)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids are not unique")
    run_info = dict(run_info or {}, refine=refiner is not None, mask_threshold=model.config.mask_threshold,
                    mask_resample=processor.mask_resample)
    if refiner is not None:
        run_info["sam_protocol"] = processor.sam_protocol if sam_protocol is None else sam_protocol
    run_info = json.loads(json.dumps(run_info))
    created = not output_dir.exists()
    if state.is_main_process:
        check_run(output_dir, run_info, restart)
        output_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()

    done = _read_results(output_dir)
    remaining = [s for s in samples if s.id not in done]
    state.wait_for_everyone()  # every process has the same view of what is done before anyone writes
    mine = remaining[state.process_index :: state.num_processes]
    model = model.to(device if device is not None else state.device).eval()
    pipe = pipeline(PIPELINE_TASK, model=model, processor=processor, device=model.device)
    part = output_dir / f"results.part{state.process_index}.{os.getpid()}.jsonl"
    bar = tqdm(total=len(mine), desc="eval", disable=not (progress and state.is_main_process), unit="sample")
    try:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            records = _evaluate_batch(pipe, chunk, refiner, max_new_tokens, run_info.get("sam_protocol"))
            _write_run_info(output_dir / "run.json", run_info)  # with the first result, never without one
            with part.open("a", encoding="utf-8") as out:
                out.write("".join(json.dumps(record) + "\n" for record in records))
            bar.update(len(chunk))
    except BaseException:
        bar.close()  # the error goes on a line of its own, not on the bar's
        _clean_up_failed_run(output_dir, part, ids, created, single=state.num_processes == 1)
        raise
    bar.close()
    state.wait_for_everyone()

    if state.is_main_process:
        ordered = _merge_results(output_dir, ids)
        if len(ordered) != len(samples):
            raise RuntimeError(f"{len(samples) - len(ordered)} samples have no result")
        summaries = _summaries(ordered, refiner is not None)
        (output_dir / "summary.json").write_text(json.dumps(dict(summaries, run=run_info), indent=2))
        table = _summary_text(summaries, run_info)
        (output_dir / "summary.md").write_text(table + "\n")
        print(table)
    state.wait_for_everyone()
    summary = json.loads((output_dir / "summary.json").read_text())
    summary.pop("run")
    return summary


def _summaries(results: list[dict], refined: bool) -> dict:
    """The segmentation rows (without VQA samples) and the VQA summary (with VQA samples only)."""
    segmentation = [r for r in results if r.get("task") != "vqa"]
    vqa = [r for r in results if r.get("task") == "vqa"]
    summaries = {}
    if segmentation:
        summaries["STAMP"] = summarize(segmentation)
        if refined:
            summaries["STAMP + refinement"] = summarize([r["refined"] for r in segmentation])
    if vqa:
        summaries["VQA"] = summarize_vqa(vqa)
    return summaries


def _summary_text(summaries: dict, run_info: dict) -> str:
    parts = []
    rows = {name: summary for name, summary in summaries.items() if name != "VQA"}
    if rows:
        parts.append(summary_table(rows) + f"\n\nMasks: logit > {run_info['mask_threshold']:g}, "
                     f"{run_info['mask_resample']} upsampling.")
        for name, summary in rows.items():
            if "several_target_samples" in summary:
                parts.append(f"{name}, target by target on the {summary['several_target_samples']} turns with several "
                             f"<|seg|> (the k-th mask against the k-th target): mean IoU "
                             f"{summary['target_mIoU']:.2f}%, every target at IoU >= 0.5 on "
                             f"{summary['every_target_at_0.5']:.2f}%.")
    if "VQA" in summaries:
        vqa = summaries["VQA"]
        parts.append(f"VQA (answers without <|seg|>, not in the table): exact match {vqa['exact_match']:.2f}% of "
                     f"{vqa['samples']} (ignoring case, runs of whitespace and a final . ! or ?)." + (
                         " By kind: " + ", ".join(f"{kind} {one['exact_match']:.2f}% of {one['samples']}"
                                                  for kind, one in vqa["by_kind"].items()) + "."
                         if "by_kind" in vqa else ""))
    return "\n\n".join(parts)


def _evaluate_batch(pipe, samples: list[EvalSample], refiner, max_new_tokens, sam_protocol=None) -> list[dict]:
    """One pipeline call for `samples` (a left-padded batch), each scored: STAMP's masks and, with a refiner, SAM's;
    a VQA sample by its answer."""
    images = []
    for sample in samples:
        try:
            images.append(load_image(sample.image, upright=False))  # the annotations' own pixel orientation
        except (OSError, ValueError) as error:
            raise type(error)(f"{sample.where or f'sample {sample.id}'}: {error}") from None
    results = pipe([{"messages": sample.chat(image)} for image, sample in zip(images, samples)],
                   batch_size=len(samples), max_new_tokens=max_new_tokens, do_sample=False,
                   refine=refiner is not None, sam_model=refiner, sam_protocol=sam_protocol)
    return [_score(sample, image, result, refiner is not None) for sample, image, result in zip(samples, images, results)]


def _score(sample: EvalSample, image, result: dict, refined: bool) -> dict:
    record = {"id": sample.id, "prompt": sample.prompt, "response": result["text"], "masks": len(result["masks"]),
              "labels": [entry["label"] for entry in result["masks"]],
              "scores": [round(entry["score"], 6) for entry in result["masks"]]}
    if sample.task == "vqa":
        return dict(record, task="vqa", answer=sample.answer, **({"kind": sample.kind} if sample.kind else {}),
                    exact_match=normalize_answer(result["text"]) == normalize_answer(sample.answer))
    target, ignore = _sample_masks(sample, image.size)
    coarse = "coarse_mask" if refined else "mask"  # STAMP's own masks (SAM's are "mask" when refined)
    prediction = _union([entry[coarse] for entry in result["masks"]], image.size)
    record.update(sample_scores(*intersection_union(prediction, target, ignore), not target.any(), not prediction.any()))
    if sample.per_target:
        record["target_ious"] = _target_ious(sample, result["masks"], coarse, image.size)
    if refined:
        refined_prediction = _union([entry["mask"] for entry in result["masks"]], image.size)
        record["refined"] = sample_scores(
            *intersection_union(refined_prediction, target, ignore), not target.any(), not refined_prediction.any()
        )
        if sample.per_target:
            record["refined"]["target_ious"] = _target_ious(sample, result["masks"], "mask", image.size)
    return record


def _target_ious(sample: EvalSample, masks: list[dict], key: str, size) -> list[float]:
    """target_iou of the k-th predicted mask (`key` of the pipeline's k-th entry; none when it gave fewer) with the
    k-th target of a several-target turn."""
    ious = []
    for k, spec in enumerate(sample.per_target):
        target = None if spec is None else load_mask(spec, size, sample.root, f"{sample.where or sample.id} mask {k}")
        prediction = _union([masks[k][key]], size) if k < len(masks) else None
        ious.append(target_iou(prediction, target))
    return ious


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


def _merge_results(output_dir: Path, ids: list[str]) -> list[dict]:
    """Every finished result of `ids`, in their order, into results.jsonl (atomically); the part files removed."""
    results = _read_results(output_dir)
    ordered = [results[i] for i in ids if i in results]
    temporary = output_dir / "results.jsonl.tmp"
    temporary.write_text("".join(json.dumps(r) + "\n" for r in ordered), encoding="utf-8")
    temporary.replace(output_dir / "results.jsonl")
    for leftover in output_dir.glob("results.part*.jsonl"):
        leftover.unlink()
    return ordered


def _clean_up_failed_run(output_dir: Path, part: Path, ids: list[str], created: bool, single: bool) -> None:
    """After a failure: a single process keeps what finished in results.jsonl (the next run resumes it) and no part
    file; a folder this run created and left empty goes. (Several processes keep their part files: the others may
    still be writing theirs.)"""
    if single and part.exists():
        _merge_results(output_dir, ids)
    if created and output_dir.is_dir() and not any(output_dir.iterdir()):
        output_dir.rmdir()


RESULT_FILES = ("results.jsonl", "results.jsonl.tmp", "results.part*.jsonl", "summary.json", "summary.md", "run.json")


def clear_results(output_dir) -> None:
    """Remove what an evaluation wrote under `output_dir` (results, part files, summaries, run.json); other files
    stay."""
    for pattern in RESULT_FILES:
        for file in Path(output_dir).glob(pattern):
            file.unlink()


def check_run(output_dir, run_info: dict, restart: bool = False, only_given: bool = False) -> None:
    """
    May this run write into `output_dir`? With `restart`, the previous results are removed first. Otherwise a folder
    with results is resumed only if its run.json holds the same run_info; the first field that differs is named in
    one line (ValueError). `only_given`: compare only the fields of `run_info` (a check made before the model is
    loaded, when the fields that come from it are not known yet).
    """
    output_dir = Path(output_dir)
    if restart:
        clear_results(output_dir)
        return
    path = output_dir / "run.json"
    advice = "pass --restart (restart=True in Python) to start over, or choose another --output"
    if not path.exists():
        if (output_dir / "results.jsonl").exists() or any(output_dir.glob("results.part*.jsonl")):
            raise ValueError(f"{output_dir} holds results without a run.json saying what run they are of; {advice}")
        return
    previous = json.loads(path.read_text())
    current = json.loads(json.dumps(run_info))
    fields = list(current) + ([] if only_given else [k for k in previous if k not in current])
    for name in fields:
        then, now = previous.get(name, "(not recorded)"), current.get(name, "(not recorded)")
        if then != now:
            raise ValueError(f"{output_dir} holds the results of another run: {name} differs ({_shown(then)} there, "
                             f"{_shown(now)} now); {advice}")


def _shown(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:16] + "..."  # a fingerprint: its start tells them apart


def _write_run_info(path: Path, run_info: dict) -> None:
    if not path.exists():
        temporary = path.with_name(f"run.json.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(run_info, indent=2))
        temporary.replace(path)


def model_fingerprint(folder) -> str | None:
    """
    What identifies a checkpoint folder's weights and config, computed from the folder without loading it: the
    SHA-256 of every file at its top level (weights, config.json, generation and processor configs, tokenizer; not
    hidden files, not *.md), names and contents in name order. None if `folder` is not a local folder (a Hub id).

    All the bytes, not sizes and dates: retraining keeps every tensor's shape (the safetensors header is unchanged)
    and a copy can keep dates. SHA-256 reads 0.6-1.1 GB/s on one core (measured on the test machine, files in the page
    cache): 4-7 s for a 2B checkpoint in bfloat16 (4.4 GB), less than loading it takes, and it leaves the files in the
    page cache for the load that follows.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.is_file() and not file.name.startswith(".") and file.suffix != ".md":
            digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
            with file.open("rb") as handle:
                while chunk := handle.read(1 << 24):
                    digest.update(chunk)
    return digest.hexdigest()


def samples_fingerprint(samples: list[EvalSample]) -> str:
    """SHA-256 of the samples as read (ids, image paths, prompts, conversations, answers, mask specifications): the
    data's content as the evaluation sees it, whatever its format and however its path is written (not the pixels of
    the image and PNG files)."""
    from dataclasses import asdict

    def absolute(sample):
        fields = dict(asdict(sample), image=str(Path(sample.image).resolve()), root=str(Path(sample.root).resolve()))
        fields.pop("where")  # the data file as named on the command line
        for added in ("per_target", "kind"):  # unset: data keeps the fingerprint it had before these fields
            if fields[added] is None:
                fields.pop(added)
        return fields

    text = json.dumps([absolute(sample) for sample in samples], default=str, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = [
    "EvalSample",
    "Refiner",
    "check_run",
    "clear_results",
    "evaluate",
    "intersection_union",
    "target_iou",
    "load_grefcoco",
    "load_jsonl_samples",
    "load_reasonseg",
    "load_refer",
    "load_samples",
    "model_fingerprint",
    "normalize_answer",
    "sample_scores",
    "samples_fingerprint",
    "summarize",
    "summarize_vqa",
    "summary_table",
]
