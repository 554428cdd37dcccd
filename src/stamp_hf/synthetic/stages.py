"""The stages that build the small demo STAMP (stamp_hf.synthetic.build runs them): its base model (a plain Qwen2-VL
checkpoint, the stand-in for Qwen2-VL-Instruct), its tokenizer (learned offline on the synthetic data's language), the
base's vision and dialogue training, the evaluation on both held-out sets and the model card. A user of the shipped
demo model needs none of this (see stamp_hf.demo_model).

Why these sizes: 8 px ViT patches without the 2 x 2 merge, images resized by the processor into 144..256 patches, so
masks are predicted on a grid of about 16 x 16 cells of 8 px, fine enough for the shapes (26 to 58 px across at that
scale) and small enough to train on a CPU. The model is a few MB, so it ships inside the repository.
"""

import json
import random
import shutil
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data import IGNORE_INDEX, STAMPCollator, encode_record, load_mask, read_records
from ..from_scratch import base_config, bpe_tokenizer
from ..modeling_stamp import mask_target
from ..processing_stamp import QWEN2_VL_CHAT_TEMPLATE, STAMPProcessor, load_image, user_turn
from ..prompts import RES_ANSWERS, RES_QUESTIONS
from .scenes import COLOURS, FORMS, SHAPES, SIZES, draw_scene, find_reference, make_sample, split_seeds

DEMO_ARCHITECTURE = dict(hidden_size=192, num_layers=4, vision_depth=4, vision_embed_dim=96, patch_size=8,
                         merge_size=1)
MIN_PLACEHOLDERS, MAX_PLACEHOLDERS = 144, 256
TOKENIZER_VOCAB_SIZE = 700
CHAT_WORDS = "system user assistant You are a helpful assistant."


def demo_corpus(samples: int = 3000) -> list[str]:
    """The texts the demo tokenizer learns its merges on: conversations and references of training seeds only, and
    the paper's templates around them."""
    rng = random.Random(0)
    texts = [CHAT_WORDS]
    for seed in split_seeds("train", samples):
        texts.extend(m["content"].replace("<|seg|>", "") for m in make_sample(seed).messages)
        shapes, image, _ = draw_scene(random.Random(seed))
        found = find_reference(rng, shapes, image.size, rng.choice(FORMS), rng.random() < 0.8)
        if found is not None:
            phrase = found[0].phrase(rng)
            texts += [rng.choice(RES_QUESTIONS).format(phrase), rng.choice(RES_ANSWERS).format(phrase).replace("<|seg|>", "")]
    return texts


def demo_tokenizer():
    """A byte-level BPE tokenizer with Qwen2-VL's special tokens (no STAMP tokens: those come with `stamp-hf init`),
    learned on `demo_corpus()`."""
    return bpe_tokenizer(demo_corpus(), TOKENIZER_VOCAB_SIZE, stamp_tokens=False)


# ---------------------------------------------------------------------------------------------- the base model


def base_processor(image_processor, tokenizer) -> STAMPProcessor:
    """The chat processor of a plain Qwen2-VL base of the demo's size: the package's processor (its one chat encoder)
    with the base's image processor and tokenizer, N bounded by MIN/MAX_PLACEHOLDERS (merge_size 1: one token per
    8 px patch, the base's own min/max pixels)."""
    return STAMPProcessor(image_processor=image_processor, tokenizer=tokenizer, min_placeholders=MIN_PLACEHOLDERS,
                          max_placeholders=MAX_PLACEHOLDERS)


def build_base(seed: int = 0, tokenizer=None):
    """A randomly initialised plain Qwen2-VL (transformers' Qwen2VLForConditionalGeneration) of the demo's size and its
    chat processor (base_processor)."""
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    tokenizer = tokenizer if tokenizer is not None else demo_tokenizer()
    config = base_config(tokenizer, "qwen2_vl", **DEMO_ARCHITECTURE)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>")],
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    patch = DEMO_ARCHITECTURE["patch_size"]
    image_processor = Qwen2VLImageProcessor(patch_size=patch, merge_size=DEMO_ARCHITECTURE["merge_size"],
                                            min_pixels=MIN_PLACEHOLDERS * patch**2, max_pixels=MAX_PLACEHOLDERS * patch**2)
    return model, base_processor(image_processor, tokenizer)


def load_base(folder):
    """The plain Qwen2-VL base that save_base wrote in `folder`, as (model, chat processor)."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    model = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    return model, base_processor(Qwen2VLImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))


def save_base(model, processor: STAMPProcessor, folder) -> Path:
    """The base as a Qwen2-VL Hub repo holds it: model and generation config, tokenizer, chat template and
    preprocessor_config.json (what `stamp-hf init` reads)."""
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, indent=2))
    image_processor = processor.image_processor
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": image_processor.size["shortest_edge"], "max_pixels": image_processor.size["longest_edge"],
        "patch_size": image_processor.patch_size, "temporal_patch_size": 2, "merge_size": image_processor.merge_size,
        "image_mean": list(image_processor.image_mean), "image_std": list(image_processor.image_std),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    }, indent=2))  # fmt: skip
    return folder


# ---------------------------------------------------------------------------------------------- vision pretraining

# What the vision tower learns to tell on every patch before any language: the kind of the shape on it (or
# background), its colour and its size, and where in the image (column and row, in POSITION_BINS of the width and
# height) the thing on it is: the shape's centre on a shape's patches, the patch itself on background; and whether
# the patch holds a shape's centre (one patch per shape, meant to let attention count shapes rather than patches;
# unmeasured: with all six targets the dialogue probe learned slower, benchmarks/results/demo_dialogue_levers_cpu.json).
POSITION_BINS = 8
PATCH_ATTRIBUTES = {"kind": ("background", *SHAPES), "colour": COLOURS, "size": tuple(SIZES),
                    "column": tuple(range(POSITION_BINS)), "row": tuple(range(POSITION_BINS)),
                    "centre": ("no", "yes")}
SHAPE_TARGETS = ("kind", "colour", "size")  # what the shipped demo model's vision tower learned
CENTRE_WEIGHT = 10.0  # of a centre patch in the probe's loss: one patch per shape, else "no" everywhere is cheap
VISION_PRETRAINING_START = 50_000_000  # train-split seeds far past any conversation the data uses


def position_bin(coordinate: torch.Tensor, extent: float) -> torch.Tensor:
    return (coordinate * POSITION_BINS / extent).long().clamp(0, POSITION_BINS - 1)


def patch_attributes(shapes, object_masks, grid) -> dict[str, torch.Tensor]:
    """Class indices per patch of the (rows, cols) grid, as PATCH_ATTRIBUTES names them: of the shape covering at
    least half of the patch; colour and size are -100 (ignored) on background patches, column and row are the
    shape's centre (on background: the patch's), centre marks the patch holding a shape's centre."""
    rows, cols = grid
    labels = {"kind": torch.zeros(grid, dtype=torch.long),
              "column": position_bin(torch.arange(cols) + 0.5, cols).expand(rows, cols).clone(),
              "row": position_bin(torch.arange(rows) + 0.5, rows)[:, None].expand(rows, cols).clone(),
              "centre": torch.zeros(grid, dtype=torch.long)}
    labels.update({name: torch.full(grid, -100, dtype=torch.long) for name in ("colour", "size")})
    for shape, mask in zip(shapes, object_masks):
        cells = mask_target(torch.from_numpy(mask), grid).bool()
        height, width = mask.shape
        for name, value in (("kind", shape.kind), ("colour", shape.colour), ("size", shape.size)):
            labels[name][cells] = PATCH_ATTRIBUTES[name].index(value)
        labels["column"][cells] = position_bin(torch.tensor(float(shape.cx)), width)
        labels["row"][cells] = position_bin(torch.tensor(float(shape.cy)), height)
        labels["centre"][min(shape.cy * rows // height, rows - 1), min(shape.cx * cols // width, cols - 1)] = 1
    return labels


def pretrain_vision_tower(model, image_processor, steps: int, batch_size: int = 16, learning_rate: float = 2e-3,
                          start: int = VISION_PRETRAINING_START, log_every: int = 250, log=None,
                          targets=SHAPE_TARGETS) -> list[dict]:
    """Stand-in for Qwen2-VL's pretrained vision tower, which the paper's STAMP starts from and the demo cannot
    download: train the base's vision tower (merger included: the features the language model sees) with a linear
    probe, thrown away afterwards, to tell each patch's `targets` (of PATCH_ATTRIBUTES) on synthetic scenes of every
    image size.

    Why: trained from scratch through language alone, a small ViT takes tens of thousands of steps to tell a star
    from a circle (its patches see colour at once, shape only by comparing neighbours); with the patch labels it
    learns in a few thousand. Returns the foreground accuracy of each attribute every `log_every` steps."""
    from transformers import get_cosine_schedule_with_warmup

    vision = model.model.visual
    classes = {name: len(PATCH_ATTRIBUTES[name]) for name in targets}
    probe = torch.nn.Linear(model.config.text_config.hidden_size, sum(classes.values()))
    parameters = [*vision.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    seeds = iter(split_seeds("train", steps * batch_size, start))
    merge = image_processor.merge_size
    vision.train()
    history, window = [], []
    for step in range(1, steps + 1):
        scenes = [draw_scene(random.Random(next(seeds))) for _ in range(batch_size)]
        inputs = image_processor(images=[image for _, image, _ in scenes], return_tensors="pt")
        features = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                            return_dict=True).pooler_output)
        labels = [patch_attributes(shapes, masks, (int(g[1]) // merge, int(g[2]) // merge))
                  for (shapes, _, masks), g in zip(scenes, inputs["image_grid_thw"])]
        logits = probe(features).split(list(classes.values()), -1)
        loss, accuracy = 0.0, {}
        foreground = torch.cat([label["kind"].flatten() for label in labels]) > 0
        for name, name_logits in zip(classes, logits):
            target = torch.cat([label[name].flatten() for label in labels])
            weight = torch.tensor([1.0, CENTRE_WEIGHT]) if name == "centre" else None
            loss = loss + F.cross_entropy(name_logits, target, weight=weight, ignore_index=-100)
            accuracy[name] = (name_logits.argmax(-1) == target)[foreground].float().mean().item()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        window.append(accuracy)
        if step % log_every == 0 or step == steps:
            history.append({"step": step, **{n: sum(a[n] for a in window) / len(window) for n in classes}})
            window = []
            if log is not None:
                log(history[-1])
    return history


FEATURE_SAMPLE_START = 60_000_000  # train-split seeds of the scenes whose patch features balance_features measures


@torch.no_grad()
def balance_features(model, image_processor, scenes: int = 400, power: float = 0.25, floor: float = 1.0) -> None:
    """Even out the spread of the vision features' main directions (a partial whitening, folded into the merger's
    last layer) and bring them to the token embeddings' length.

    Why: after the probe, shape kind dominates the features (between-kind variance 42 % of the whole, between-colour
    14 %), and gradient descent learns low-variance directions last: without this the language model learned to
    read kinds and hardly colours. Scaling each principal direction by eigenvalue ** -power, the eigenvalues raised
    to at least `floor` times their mean (so the near-empty directions stay small), gives kind 31 %, colour 30 %, size
    17 % (measured on the demo's features); full whitening (power 0.5) would blow noise up to most of the variance.
    Features also come out about 100 times longer than the token embeddings and would drown what a placeholder,
    embed(<|mask|>) + feature, reads from the sentence."""
    vision = model.model.visual
    vision.eval()
    seeds = split_seeds("train", scenes, FEATURE_SAMPLE_START)
    features = []
    for chunk in range(0, scenes, 16):
        images = [draw_scene(random.Random(seed))[1] for seed in seeds[chunk:chunk + 16]]
        inputs = image_processor(images=images, return_tensors="pt")
        features += model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                   return_dict=True).pooler_output
    features = torch.cat(features).double()
    mean = features.mean(0)
    values, vectors = torch.linalg.eigh(torch.cov((features - mean).T))
    values = values.clamp_min(floor * values.mean())
    transform = vectors @ torch.diag(values**-power) @ vectors.T
    length = model.get_input_embeddings().weight.norm(dim=-1).mean().double()
    transform *= length / ((features - mean) @ transform).norm(dim=-1).mean()
    last = vision.merger.mlp[-1]
    last.weight.copy_((transform @ last.weight.double()).to(last.weight.dtype))
    last.bias.copy_((transform @ (last.bias.double() - mean)).to(last.bias.dtype))


# ---------------------------------------------------------------------------------------------- dialogue training


def dialogue_batch(processor: STAMPProcessor, records) -> dict:
    """One padded batch of training-format records without masks, tokenized and padded by the training path's own
    `encode_record` and STAMPCollator (labels on the assistant turns only)."""
    items = [dict(encode_record(processor, record.load_image(), record.messages), mask_labels=[])
             for record in records]
    batch = STAMPCollator(processor)(items)
    batch.pop("mask_labels")
    return batch


def train_dialogue(model, processor, jsonl, steps: int, batch_size: int = 8, learning_rate: float = 1e-3,
                   log_every: int = 50, log=None) -> list[dict]:
    """The base's instruction tuning (the stand-in for Qwen2-VL-Instruct's): next-token loss on the answers of the
    dialogue records (`stamp-hf prepare-data` of the LLaVA export), the vision tower frozen. Returns the loss and
    the answer-token accuracy every `log_every` steps."""
    from transformers import get_cosine_schedule_with_warmup

    records = read_records(jsonl)
    model.model.visual.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    order = random.Random(0)
    model.train()
    history, window = [], []
    for step in range(1, steps + 1):
        batch = dialogue_batch(processor, order.sample(records, batch_size))
        out = model(**batch)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        target = batch["labels"][:, 1:]
        hits = (out.logits[:, :-1].argmax(-1) == target)[target != IGNORE_INDEX]
        window.append((out.loss.item(), hits.float().mean().item()))
        if step % log_every == 0 or step == steps:
            history.append({"step": step, "loss": float(np.mean([w[0] for w in window])),
                            "answer_token_accuracy": float(np.mean([w[1] for w in window]))})
            window = []
            if log is not None:
                log(history[-1])
    model.model.visual.requires_grad_(True)
    return history


# ---------------------------------------------------------------------------------------------- evaluation

SEGMENTATION_TASKS = ("refer", "none")


def read_tasks(jsonl) -> list[dict]:
    """The task, form and all-shapes mask of each record of a held-out .jsonl file, in order."""
    return [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]


@torch.no_grad()
def answer(model, processor, image, question: str, max_new_tokens: int = 40) -> str:
    """The model's greedy answer to one question about `image`, through the inference path every caller uses,
    special tokens kept (so `<|seg|>` shows)."""
    inputs, images = processor.encode_chat([user_turn([image], question)])
    out = model.generate_with_masks(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    (result,) = processor.post_process_generation(out, inputs["input_ids"].shape[1], [[images[0].size[::-1]]],
                                                  model.config.mask_threshold,
                                                  stop_ids=model.generation_config.eos_token_id)
    return result["text"].strip()


def single_questions(data, sets=("test", "drawn")) -> list[tuple]:
    """(image path, question, answer, "set/kind") of every record of the held-out `sets` under `data` that asks one
    question and nothing else: what a plain base (no masks) can be scored on."""
    items = []
    for name in sets:
        for record in read_tasks(Path(data) / f"{name}.jsonl"):
            if record["task"] == "vqa" and len(record["messages"]) == 2:
                question, reply = record["messages"]
                items.append((Path(data) / record["image"], question["content"], reply["content"],
                              f"{name}/{reply['kind']}"))
    return items


@torch.no_grad()
def base_vqa_exact(model, processor, items) -> dict:
    """% exact (evaluation.normalize_answer) greedy answers of a plain base (a qwen2_vl model, no masks: its text up to
    the end-of-turn token) to `items` of single_questions, per "set/kind", per set and "all". Leaves the model in the
    mode it was in."""
    from ..evaluation import normalize_answer

    stop = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    training, hits = model.training, {}
    model.eval()
    for image, question, reply, key in items:
        inputs, _ = processor.encode_chat([user_turn([load_image(image, upright=False)], question)])
        ids = model.generate(**inputs, max_new_tokens=40, do_sample=False, eos_token_id=stop, pad_token_id=stop)
        text = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for group in {key, key.split("/")[0], "all"}:
            hits.setdefault(group, []).append(normalize_answer(text) == normalize_answer(reply))
    model.train(training)
    return {group: round(100 * sum(h) / len(h), 1) for group, h in sorted(hits.items())}


def _scores(jsonl, predict) -> dict:
    """cIoU / gIoU / N-acc / T-acc over the segmentation requests of a held-out file of `predict(record, target,
    folder)`, a boolean mask; per request form too."""
    from ..evaluation import intersection_union, sample_scores, summarize

    folder = Path(jsonl).parent
    scores, by_form = [], {}
    for number, record in enumerate(read_tasks(jsonl)):
        if record["task"] not in SEGMENTATION_TASKS:
            continue
        with Image.open(folder / record["image"]) as image:  # its size only
            size = image.size
        target = load_mask(record["masks"][0], size, folder, f"{jsonl}:{number + 1}")
        prediction = predict(record, target, folder)
        score = sample_scores(*intersection_union(prediction, target), not target.any(), not prediction.any())
        scores.append(score)
        by_form.setdefault(record["form"], []).append(score)
    return {**summarize(scores), "cIoU_by_form": {f: summarize(s)["cIoU"] for f, s in sorted(by_form.items())}}


def language_blind_baseline(jsonl) -> dict:
    """The oracle that masks every shape whatever the request: what a model scores by telling shapes from
    background without grounding the words."""
    return _scores(jsonl, lambda record, target, folder: load_mask({"png": record["all_shapes"]}, target.shape[::-1],
                                                                   folder, str(jsonl)))


def grid_ceiling(jsonl, processor, fit_steps: int = 200) -> dict:
    """The best a model can score on the patch grid: free logits per cell fitted to the true mask by the training
    loss on the upsampled masks (`mask_loss_resolution="image"`), then post-processed as every prediction is."""
    from ..modeling_stamp import bce_dice_loss
    from ..processing_stamp import upsample_mask_logits

    def predict(record, target, folder):
        image = load_image(folder / record["image"], upright=False)
        grid = processor.mask_grid(processor.image_processor(images=[image])["image_grid_thw"][0])
        pixels = torch.from_numpy(target).float()
        logits = (mask_target(pixels, grid) * 2 - 1).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([logits], lr=0.1)
        for _ in range(fit_steps):
            loss = bce_dice_loss(upsample_mask_logits(logits, pixels.shape), pixels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return processor.post_process_masks([[logits.detach()]], [target.shape])[0][0].numpy()

    return _scores(jsonl, predict)


def evaluate_demo(model, processor, jsonl, output_dir, limit: int | None = None, batch_size: int = 8) -> dict:
    """On a held-out file (the generator's test split or the drawn set): cIoU / gIoU / N-acc / T-acc (in %) of the
    segmentation requests and cIoU per request form (stamp_hf.evaluation), the share of them answered with a
    `<|seg|>`; exact-answer accuracy of the questions, per question kind, and the share answered without a `<|seg|>`.
    `model`, `processor`: a loaded STAMP and its processor (whose mask_resample post-processes the masks).
    `limit`: only the first `limit` records."""
    from ..evaluation import evaluate, load_jsonl_samples, summarize

    tasks = read_tasks(jsonl)[:limit]
    samples = [s for s in load_jsonl_samples(jsonl) if s.id.endswith(":1")][: len(tasks)]  # each record's first turn
    segment = [(s, t) for s, t in zip(samples, tasks) if t["task"] in SEGMENTATION_TASKS]
    summary = evaluate(model, processor, [s for s, _ in segment], Path(output_dir) / "segmentation", progress=False,
                       batch_size=batch_size)["STAMP"]
    rows = [json.loads(line) for line in (Path(output_dir) / "segmentation" / "results.jsonl").read_text().splitlines()]
    by_form = {}
    for row, (_, task) in zip(rows, segment):
        by_form.setdefault(task["form"], []).append(row)
    questions = [(s, t) for s, t in zip(samples, tasks) if t["task"] == "vqa"]
    by_kind, no_seg = {}, 0
    for sample, task in questions:
        image = load_image(Path(jsonl).parent / task["image"], upright=False)  # dataset images: stored orientation
        response = answer(model, processor, image, sample.prompt)
        truth = task["messages"][1]["content"]
        by_kind.setdefault(task["form"], []).append(response == truth)
        no_seg += "<|seg|>" not in response
    exact = [hit for hits in by_kind.values() for hit in hits]
    return {
        "cIoU": summary["cIoU"], "gIoU": summary["gIoU"], "N-acc": summary["N-acc"], "T-acc": summary["T-acc"],
        "segmentation_samples": len(segment),
        "cIoU_by_form": {form: summarize(form_rows)["cIoU"] for form, form_rows in sorted(by_form.items())},
        "seg_rate": 100 * sum("<|seg|>" in r["response"] for r in rows) / len(rows),
        "vqa_samples": len(exact),
        "vqa_exact": 100 * sum(exact) / len(exact) if exact else None,
        "vqa_by_kind": {kind: 100 * sum(hits) / len(hits) for kind, hits in sorted(by_kind.items())},
        "no_seg_rate": 100 * no_seg / len(exact) if exact else None,
    }


# ---------------------------------------------------------------------------------------------- shipping

CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: image-segmentation
tags: [stamp, referring-segmentation, synthetic, demo]
---

# STAMP demo model (synthetic shapes)

**What it is.** A {params:.1f} M-parameter STAMP of Qwen2-VL structure ({vision_depth}-layer ViT with {patch} px patches
and no 2 x 2 merge, {layers}-layer language model of width {hidden}, a {vocab}-token byte-level BPE vocabulary learned
on the synthetic data's sentences), built on CPU the way the paper builds STAMP and with stamp-hf's public commands.
It knows coloured circles, squares, triangles, stars and diamonds (red, green, blue, yellow, purple, orange; small or
big) on pale backgrounds, images of any size (the processor resizes them into 144 to 256 patches of 8 px, the mask
grid). It exists so that `stamp-hf segment`, the examples and the web demo run offline out of the box, with answers
and masks that are real. {verdict}

**How it was built** (`python -m stamp_hf.synthetic.build --ship demo_model` in the stamp-hf repository; nothing
downloaded; times on a 2-core CPU, {threads} torch threads, measured by the script around each stage):
{base_steps}
3. `stamp-hf init BASE STAMP --min-placeholders 144 --max-placeholders 256`: the four STAMP tokens and the mask head.
4. `stamp-hf train` ({v2_steps} steps of batch 8, {stamp_v2_minutes:.1f} min): a gRefCOCO-format export of the scenes
   through `stamp-hf prepare-data` (the paper's Prompt S1 templates; present and absent targets asked alike), mixed
   with the dialogue data and the generator's own conversations (everyday requests, two-turn chats), as in the
   paper's "Dialogue & Seg." column; the vision tower frozen, the mask loss on the upsampled masks.
5. `stamp-hf train` again from step 4's model ({steps} steps of batch 8, peak learning rate {learning_rate:g},
   {stamp_minutes:.1f} min) on the v3 data: the same referring export, questions of eight kinds (count, colour,
   kind, size, position, existence, relations, a description listing the shapes), chats of 2-4 turns that switch
   between questions and new requests and refer back ("segment it", "and the other one", "the one left of it"), and
   requests naming two or three targets, answered with one labelled `<|seg|>` per target.
{conversation_step}{rebalance_steps}
Whole training: {total_minutes:.1f} min.

**What it is not.** Not the paper's STAMP-2B or STAMP-7B, not initialised from Qwen2-VL, not useful on natural images
or for open dialogue: it knows only these shapes, colours, sizes and positions. Use a real checkpoint
(`--model org/stamp-2b`) for real work.
{limits}

## Results (no SAM; seeds never used in training)

{measured}

Two held-out sets: the generator's test split, and a separately drawn set (plain PIL primitives in PIL's named
colours on flat backgrounds at 320x240, 500x300, 200x400 and 640x480, requests in a person's words).

{results}

{ablation}

## Use

```python
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained("demo_model", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("demo_model", trust_remote_code=True)
```
"""

TRAIN_FILES = ("refer_train.jsonl", "dialogue_train.jsonl", "train.jsonl")  # a data folder's training mix (build)
TARGET_CIOU = 85.0  # the demo model's goal on both held-out sets (cIoU and gIoU, no SAM)


def demo_limits(results: dict) -> str:
    """The card's sentence on the dialogue abilities below their goals (VQA 90 %, chat switches 90 %, several
    targets 85 %), from the measured figures of both sets, and existence_advice's."""
    goals = [("questions are answered exactly", "vqa_exact", 90.0),
             ("a later segmentation request in a chat gets every mask right", "chat_switch", 90.0),
             ("a request naming several targets gets every mask right", "multi_all_right", 85.0)]
    worst = {key: min((r["conversations"][key] for r in results.values() if r["conversations"][key] is not None),
                      default=None) for _, key, _ in goals}  # None: no such turns in either set
    short = [f"{what} on {worst[key]:.0f} % of turns (goal {goal:.0f} %)"
             for what, key, goal in goals if worst[key] is not None and worst[key] < goal]
    return " ".join(filter(None, [("Below its dialogue goals: " + "; ".join(short) + ".") if short else "",
                                  existence_advice(results)]))


KIND_GOAL = 80.0  # the demo model's goal for each question kind (VQA exact %)


def existence_advice(results: dict) -> str:
    """The card's advice when the mask tells whether a target is there better than the yes or no does (the yes/no
    below KIND_GOAL): the worse set's figures of both."""
    exists = [r["conversations"].get("vqa_by_kind", {}).get("exists") for r in results.values()]
    absent_empty = [r.get("N-acc") for r in results.values()]
    if None in exists or None in absent_empty or min(exists) >= KIND_GOAL or min(absent_empty) <= min(exists):
        return ""
    return (f'Its yes or no to "Is there a ...?" is right on {min(exists):.0f} % of turns: ask for the mask instead, '
            f"which is empty for an absent target on {min(absent_empty):.0f} % of requests.")


def demo_measured(summary: dict) -> str:
    """The card's sentence on what the figures were measured on, and on the steps this build took from elsewhere
    rather than ran: stage 4's model when its cache was seeded from an earlier model, and the later steps whose caches
    were seeded from a committed build summary (stamp_hf.synthetic.seed_caches)."""
    limit = summary["results"]["test"].get("limit")
    records = summary["data"]["records"]
    sentence = (f"Measured on every record of both held-out sets ({records['test.jsonl']} and "
                f"{records['drawn.jsonl']})." if limit is None else
                f"Measured on the first {limit} records of each held-out set (`--eval-limit {limit}`, for time).")
    stage_4_origin = summary["stamp_v2"].get("seeded_from")
    if stage_4_origin:
        sentence += f" Stage 4's model is {stage_4_origin}; stages 1-4 were not rerun for it."
    later = [record for record in (summary["stamp"], (summary.get("conversations") or {}).get("train"),
                                   *rebalance_rounds(summary)) if record]
    seeded_steps = [step for step, record in enumerate(later, start=5) if record.get("seeded_from")]
    if seeded_steps:
        step = seeded_steps[-1]
        sentence += (f" Steps 5-{step} are the ones recorded in {later[step - 5]['seeded_from']} (figures and times as "
                     f"measured then); this build ran only what follows them.")
    return sentence


def rebalance_rounds(summary: dict) -> list[dict]:
    """A build summary's rebalance records, one per round (a summary written before rounds holds one record)."""
    record = summary.get("rebalance") or []
    return record if isinstance(record, list) else [record]


def train_seconds(train: dict) -> float:
    """A `stamp-hf train` stage's time: every part of it when it was stopped and resumed (`seconds`), else the last
    run's (a record from before parts were timed, or one resumed from an untimed part)."""
    return train["seconds"] if train.get("seconds") is not None else train["seconds_this_run"]


def wrap_step(text: str) -> str:
    """A numbered step of the card's list, wrapped to the template's width with its continuation lines indented."""
    return textwrap.fill(text, width=120, subsequent_indent="   ", break_on_hyphens=False) + "\n"


def conversation_step(summary: dict) -> str:
    """The card's step 6, when the build ran its third `stamp-hf train` (more questions, chats and several-target
    requests); empty otherwise."""
    conversations = summary.get("conversations")
    if not conversations:
        return ""
    data, train = conversations["data"], conversations["train"]
    records = summary["data"]["records"]
    total = data["records"] + sum(records[f] for f in TRAIN_FILES)
    return wrap_step(
        f"6. `stamp-hf train` again from step 5's model ({train['steps']} steps of batch 8, peak learning rate "
        f"{train['learning_rate']:g}, {train_seconds(train) / 60:.1f} min) on step 5's data plus "
        f"{data['records']} fresh conversations of the same generator (questions, chats and several-target "
        f"requests on scenes never used before): {data['records']} of the {total} records it trains on.")


def rebalance_steps(summary: dict) -> str:
    """The card's last steps (from 7, or 6 without the conversation step), one per rebalance round the build ran (the
    referring records counted more, at a lower learning rate, each round from the one before); empty without one."""
    first = 7 if summary.get("conversations") else 6
    why = (": the conversations had crowded out one-target requests, absent targets especially"
           if summary.get("conversations") else "")
    steps, rounds = [], rebalance_rounds(summary)
    for index, train in enumerate(rounds):
        step = first + index
        run = (f"{step}. `stamp-hf train` again from step {step - 1}'s model ({train['steps']} steps of batch 8, peak "
               f"learning rate {train['learning_rate']:g}, {train_seconds(train) / 60:.1f} min)")
        if index == 0:
            text = (f"{run} on step {step - 1}'s mix with the referring export counted "
                    f"{train['repeats']['refer_train.jsonl']} times{why}.")
        else:
            text = f"{run}, once more on step {step - 1}'s mix{mask_loss_course(rounds[index - 1], step - 1)}."
        steps.append(wrap_step(text))
    return "".join(steps)


def mask_loss_course(train: dict, step: int) -> str:
    """", as step N's mask loss went from A (its first tenth of logged steps) to B (its last tenth)", from a train
    stage's logged losses; empty when it has none logged (why the card's next round went on)."""
    losses = [entry["mask_loss"] for entry in train.get("log", [])]
    if not losses:
        return ""
    tenth = max(1, len(losses) // 10)
    start, end = (sum(part) / len(part) for part in (losses[:tenth], losses[-tenth:]))
    return f", as step {step}'s mask loss went from {start:.2f} (its first tenth of steps) to {end:.2f} (its last)"


TARGET_TEXT = {"kind": "shape kind", "colour": "colour", "size": "size",
               "column": "column of its shape's centre (of 8)", "row": "row of its shape's centre (of 8)",
               "centre": "whether it holds a shape's centre"}
# (the question kinds, where they came from) of each --dialogue-data
DIALOGUE_DATA_TEXT = {"llava-v2": ("counts, colours, kinds, sizes, positions, existence, descriptions",
                                   "a LLaVA-format export written through `stamp-hf prepare-data`"),
                      "questions-v3": ("counts, colours, kinds, sizes, positions, existence, relations, descriptions",
                                       "every question of the v3 training data (its LLaVA export and the generator's "
                                       "conversations)")}


def vision_targets_text(targets) -> str:
    """"each patch's shape kind, colour and size" for the targets the vision stage recorded."""
    words = [TARGET_TEXT[name] for name in targets]
    return "each patch's " + (", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0])


def base_answers_text(answers: dict | None) -> str:
    """" Asked the held-out sets' N single-question records, it answered exactly A % of the test split's and B % of
    the drawn set's." from the build's base-answers record; empty without one (or without such records)."""
    if not answers or not answers["records"]:
        return ""
    exact = answers["exact"]
    shares = [f"{exact[name]:.1f} % of the {what}" for name, what in (("test", "test split's"), ("drawn", "drawn set's"))
              if name in exact]
    return (f" Asked the held-out sets' {answers['records']} single-question records, it answered exactly "
            + " and ".join(shares) + ".")


def base_steps(vision: dict, dialogue: dict, timing: dict, answers: dict | None = None) -> str:
    """The card's steps 1-2 (the base's vision and dialogue stages) from their records; `answers`: the base's
    base-answers record, when the build has one."""
    accuracy = ", ".join(f"{k} {100 * v:.1f} %" for k, v in vision["history"][-1].items() if k != "step")
    kinds, source = DIALOGUE_DATA_TEXT[dialogue.get("data", "llava-v2")]
    return wrap_step(
        f"1. *Base vision tower* ({vision['steps']} steps of 16 scenes, {timing['vision'] / 60:.1f} min): the stand-in "
        f"for Qwen2-VL's pretrained ViT. A linear probe, thrown away afterwards, taught it "
        f"{vision_targets_text(vision.get('targets', SHAPE_TARGETS))}, no language (final patch accuracy: "
        f"{accuracy}). Then the features' main directions were evened out (a partial whitening folded into the "
        f"merger, so that colour counts as much as kind) and brought to the token embeddings' length."
    ) + wrap_step(
        f"2. *Base dialogue* ({dialogue['steps']} steps of batch 8, {timing['dialogue'] / 60:.1f} min): the stand-in "
        f"for Qwen2-VL-Instruct. The language model learned to answer questions about scenes ({kinds}; answer-token "
        f"accuracy at the end {100 * dialogue['history'][-1]['answer_token_accuracy']:.1f} %) from {source}."
        f"{base_answers_text(answers)} The result is a plain `qwen2_vl` checkpoint."
    ).rstrip("\n")


def write_demo_card(model_folder, target, summary: dict, results_table: str, ablation_table: str | None) -> Path:
    """Copy a trained demo model to `target` (refused if it exists) and write its model card (README.md) from the
    `summary` stamp_hf.synthetic.build keeps (every stage's record, the results and their references)."""
    from safetensors.torch import load_file

    model_folder, target = Path(model_folder), Path(target)
    if target.exists():
        raise FileExistsError(f"{target} already exists; remove it first to replace the demo model")
    shutil.copytree(model_folder, target,
                    ignore=shutil.ignore_patterns("stamp_train_config.json", "checkpoint-*", "*.bin", "training_args*"))
    config = json.loads((target / "config.json").read_text())
    params = sum(t.numel() for t in load_file(target / "model.safetensors").values()) / 1e6
    text, vision_config = config["text_config"], config["vision_config"]
    vision, dialogue = summary["vision"], summary["dialogue"]
    results, blind = summary["results"], summary["references"]
    worst = min(min(r["cIoU"], r["gIoU"]) for r in results.values())
    above_blind = all(results[s]["cIoU"] > blind[s]["blind"]["cIoU"] for s in results)
    verdict = (
        f"On both held-out sets it reaches cIoU and gIoU >= {TARGET_CIOU:.0f} without SAM." if worst >= TARGET_CIOU
        else f"Its masks follow the words (it beats the language-blind baseline below), but it is below the goal of "
        f"cIoU and gIoU >= {TARGET_CIOU:.0f}: treat its masks as a working example, not as quality." if above_blind
        else "At this training budget its masks do not yet follow the words well: it scores near a language-blind "
        "baseline that masks every shape. Treat it as a running example only."
    )
    timing = summary["timing_seconds"]
    (target / "README.md").write_text(CARD.format(
        params=params, vision_depth=vision_config["depth"], patch=vision_config["patch_size"],
        layers=text["num_hidden_layers"], hidden=text["hidden_size"], vocab=text["vocab_size"], verdict=verdict,
        threads=vision["threads"], base_steps=base_steps(vision, dialogue, timing, summary.get("base_answers")),
        steps=summary["stamp"]["steps"],
        v2_steps=summary["stamp_v2"]["steps"], stamp_v2_minutes=timing["stamp_v2"] / 60,
        learning_rate=summary["stamp"]["learning_rate"], limits=demo_limits(results), measured=demo_measured(summary),
        conversation_step=conversation_step(summary), rebalance_steps=rebalance_steps(summary),
        stamp_minutes=timing["stamp"] / 60, total_minutes=sum(timing.values()) / 60, results=results_table,
        ablation=("The paper's Table 6 ablation at this scale (mean ± std where there are several seeds):\n\n"
                  + ablation_table)
        if ablation_table else "",
    ))
    return target
