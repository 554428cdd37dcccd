"""Build the demo STAMP the way the paper builds STAMP, with the package's own public commands, evaluate it on two
held-out sets and rerun the paper's Table 6 ablation at its scale.

From a clean checkout (CPU is enough; every stage is cached under --out and resumes where it stopped):

    .venv/bin/python -m stamp_hf.synthetic.build                     # every stage, then the tables
    .venv/bin/python -m stamp_hf.synthetic.build --ship demo_model   # also writes the trained model and its card there
    .venv/bin/python -m stamp_hf.synthetic.build --ablation          # also the Table 6 variants x 3 seeds

Stages (each built only when a later one needs it and it is not cached):
  data      the generator's training scenes as a gRefCOCO export (referring expressions, present and absent targets)
            and a LLaVA export (questions and answers), its own conversations, its test split and the separately
            drawn set (stamp_hf.synthetic.drawn); the two exports go through `stamp-hf prepare-data`, as a user's
            gRefCOCO and LLaVA data would. Written twice: v2 (out/data: everyday requests, two-turn chats) and v3
            (out/data-v3: questions of eight kinds, chats of 2-4 turns that switch targets and refer back, requests
            naming two or three targets; stamp_hf.synthetic.chats).
  vision    the base's vision tower learns every patch's shape kind, colour and size (no language), then its
            features' main directions are evened out (balance_features): the stand-in for Qwen2-VL's pretrained
            vision tower.
  dialogue  the base learns to answer questions about scenes (--dialogue-data: the prepared v2 LLaVA export, or
            every v3 question): the stand-in for Qwen2-VL-Instruct. The result is a plain `qwen2_vl` checkpoint
            that transformers' own Qwen2VLForConditionalGeneration loads. Then its answers to the held-out sets'
            single-question records are scored (out/base-answers), for the card.
  init      `stamp-hf init BASE STAMP_INIT --min-placeholders 144 --max-placeholders 256`.
  train     `stamp-hf train` on the prepared v2 referring data mixed with the dialogue and chat data (the paper's
            "Dialogue & Seg." column), the vision tower frozen, the mask loss on the upsampled masks (--v2-steps);
            then `stamp-hf train` from that model on the v3 data with a fresh schedule (--steps); then again from
            that one, on the v3 data plus fresh v3 questions, chats and several-target requests
            (out/data-v3-conversations, --conversation-samples; --conversation-steps); then once more from that
            one at half the peak learning rate, with the referring export counted twice (--rebalance-steps): the
            third train's conversations crowd out one-target requests, absent targets especially. Each further
            --rebalance-steps value is one more round on that mix, from the round before, at half its peak
            learning rate.
  eval      both v3 held-out sets: cIoU, gIoU, per request form, N-acc, T-acc, VQA exact match per question kind,
            the language-blind baseline and the best score the mask grid allows; and every turn of every record
            (stamp_hf.synthetic.scoring): VQA per kind, descriptions, chat switches, several-target answers.
  ablation  the Table 6 variants from the same base on the v3 data, --seeds x --ablation-steps.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..training import resume_checkpoint
from .drawn import write_drawn_set
from .scoring import evaluate_conversations
from .scenes import write_dialogue_export, write_refer_export, write_split
from .stages import (
    DIALOGUE_DATA_TEXT,
    PATCH_ATTRIBUTES,
    SHAPE_TARGETS,
    balance_features,
    base_vqa_exact,
    build_base,
    demo_tokenizer,
    evaluate_demo,
    grid_ceiling,
    language_blind_baseline,
    load_base,
    pretrain_vision_tower,
    TRAIN_FILES,
    save_base,
    single_questions,
    train_dialogue,
    train_seconds,
    write_demo_card,
)

TRAINING = dict(
    per_device_train_batch_size=8,
    learning_rate=1e-3,
    adam_beta2=0.95,
    warmup_steps=0.03,
    lr_scheduler_type="cosine",
    weight_decay=0.0,
    max_grad_norm=1.0,
    save_strategy="steps",
    save_steps=250,
    save_total_limit=1,
    logging_steps=25,
    dataloader_num_workers=0,
    report_to="none",
)
CONVERSATION_TASKS = ("vqa", "chat", "multi")  # what the last stage trains more of: the dialogue targets
CONVERSATION_SEEDS = 3 * 10**6  # the first train-split seed of the fresh conversations (conversations_stage)
REBALANCE_REPEATS = {"refer_train.jsonl": 2}  # the fourth train's mix: referring records counted twice
VARIANTS = {
    "stamp": ("STAMP (bidirectional placeholders + patch-feature fusion)", {}),
    "causal": ("w/o A_hyb: causal placeholders", {"placeholder_attention": "causal"}),
    "nofusion": ("w/o E_mask: no patch-feature fusion", {"fuse_patch_features": False}),
}


def log_json(entry) -> None:
    print(json.dumps(entry), flush=True)


def cli(*arguments, threads: int | None = None, log: Path | None = None) -> None:
    """Run a `stamp-hf` command as a user would, in this Python environment; `threads`: its torch threads
    (OMP_NUM_THREADS), `log`: a file for its output (runs side by side would interleave theirs)."""
    command = [sys.executable, "-m", "stamp_hf.cli", *map(str, arguments)]
    print("$ stamp-hf " + " ".join(map(str, arguments)) + (f"  > {log}" if log else ""), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    if log is None:
        subprocess.run(command, check=True, env=env)
        return
    with open(log, "a") as output:
        subprocess.run(command, check=True, env=env, stdout=output, stderr=subprocess.STDOUT)


def same_settings(folder: Path, result: dict, asked: dict, earlier: dict | None = None) -> dict:
    """A cached stage's `result`, refused when it records a setting other than the one this run asks: stages are cached
    by folder, so a changed setting (a sample count, a learning rate) would otherwise reuse the old stage silently.
    A setting the result does not record (a cache written before it was) counts as its value in `earlier`, what every
    build before it used; one not there either is not compared."""
    asked = json.loads(json.dumps(asked, default=str))  # as the result.json stores them: lists, strings
    result = {**json.loads(json.dumps(earlier or {}, default=str)), **result}
    differ = [key for key, value in asked.items() if key in result and result[key] != value]
    if differ:
        raise SystemExit(f"{folder} was built with " + ", ".join(f"{k}={result[k]!r}" for k in differ)
                         + " but this run asks " + ", ".join(f"{k}={asked[k]!r}" for k in differ)
                         + ": remove that folder (or use another --out) to build it again")
    return result


def cached(folder: Path, build, settings: dict | None = None, earlier: dict | None = None) -> dict:
    """The result.json of a stage in `folder`, built by `build(folder)` (into a fresh folder) when missing. `settings`
    are recorded in it and checked against a cached one (same_settings, with `earlier`)."""
    result_file = folder / "result.json"
    if result_file.exists():
        return same_settings(folder, json.loads(result_file.read_text()), settings or {}, earlier)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    result = build(folder)
    result.update(settings or {}, seconds=time.perf_counter() - start, threads=torch.get_num_threads())
    result_file.write_text(json.dumps(result, indent=2))
    return result


def vision_stage(out: Path, steps: int, targets) -> dict:
    def build(folder):
        tokenizer = demo_tokenizer()
        model, processor = build_base(seed=0, tokenizer=tokenizer)
        history = pretrain_vision_tower(model, processor.image_processor, steps, log=log_json, targets=targets)
        balance_features(model, processor.image_processor)  # the probe is gone; even out what it left
        save_base(model, processor, folder / "model")
        return dict(steps=steps, history=history)

    return cached(out / "base-vision", build, dict(steps=steps, targets=list(targets)),
                  earlier=dict(targets=list(SHAPE_TARGETS)))


def data_stage(out: Path, args, version: str) -> dict:
    """Every data file of one data version, written once into out/data (v2) or out/data-v3 (seeds: refer export
    from 0, dialogue from 10^6, chat from 2 * 10^6 of the train split; the test split and the drawn set are held
    out). The refer export is the same in both versions."""

    def build(folder):
        write_refer_export(folder / "refer", args.refer_scenes)
        write_dialogue_export(folder / "dialogue.json", args.dialogue_scenes, start=10**6, version=version)
        write_split(folder, "train", args.chat_samples, start=2 * 10**6, version=version)
        write_split(folder, "test", args.test_samples, version=version)
        write_drawn_set(folder, args.drawn_samples, version=version)
        cli("prepare-data", "--data", folder / "refer", "--split", "train", "--images", folder / "refer" / "images",
            "--output", folder / "refer_train.jsonl")
        cli("prepare-data", "--data", folder / "dialogue.json", "--images", folder / "dialogue_images",
            "--output", folder / "dialogue_train.jsonl")
        counts = {name: sum(1 for _ in (folder / name).open()) for name in
                  (*TRAIN_FILES, "test.jsonl", "drawn.jsonl")}
        return dict(version=version, records=counts)

    return cached(data_folder(out, version), build, dict(
        version=version, **{k: getattr(args, k) for k in ("refer_scenes", "dialogue_scenes", "chat_samples",
                                                          "test_samples", "drawn_samples")}))


def conversations_stage(out: Path, samples: int) -> dict:
    """More v3 conversations for the last `stamp-hf train`: questions, chats that switch targets and several-target
    requests only (`samples` drawn, seeds from 3 * 10^6 of the train split: apart from every other stage's), cached as
    out/data-v3-conversations/train.jsonl."""

    def build(folder):
        jsonl = write_split(folder, "train", samples, start=CONVERSATION_SEEDS, tasks=CONVERSATION_TASKS, version="v3")
        return dict(samples=samples, tasks=list(CONVERSATION_TASKS), records=sum(1 for _ in jsonl.open()))

    return cached(conversations_file(out).parent, build, dict(samples=samples))


def conversations_file(out: Path) -> Path:
    return out / "data-v3-conversations" / "train.jsonl"


def data_folder(out: Path, version: str) -> Path:
    return out / ("data" if version == "v2" else f"data-{version}")


def questions_stage(out: Path, args) -> Path:
    """Every question-only record of the v3 training data (the LLaVA export's, the generator's and the extra
    conversations' questions: all eight kinds) in one .jsonl, image paths made absolute: what the base's dialogue
    stage learns to answer from, and benchmarks/demo_dialogue.py with it. Builds the v3 data and conversations stages
    it reads."""
    data = data_folder(out, "v3")
    data_stage(out, args, "v3")
    sources = [data / "dialogue_train.jsonl", data / "train.jsonl"]
    if args.conversation_samples:
        conversations_stage(out, args.conversation_samples)
        sources.append(conversations_file(out))

    def build(folder):
        records = [dict(record, image=str((source.parent / record["image"]).resolve()))
                   for source in sources for record in map(json.loads, source.read_text().splitlines())
                   if record.get("task", "vqa") == "vqa" and not record.get("masks")]
        (folder / "questions.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        return dict(records=len(records))

    folder = out / "questions-v3"
    cached(folder, build, dict(conversation_samples=args.conversation_samples))
    return folder / "questions.jsonl"


def dialogue_data(args) -> Path:
    """The .jsonl the dialogue stage trains on, as --dialogue-data names it (built when missing)."""
    if args.dialogue_data == "questions-v3":
        return questions_stage(args.out, args)
    return data_folder(args.out, "v2") / "dialogue_train.jsonl"


def dialogue_stage(args) -> dict:
    """The base after instruction tuning on --dialogue-data (dialogue_data), from the vision stage's base: a plain
    qwen2_vl checkpoint in out/base."""
    vision = args.out / "base-vision" / "model"
    jsonl = dialogue_data(args)

    def build(folder):
        model, processor = load_base(vision)
        history = train_dialogue(model, processor, jsonl, args.dialogue_steps,
                                 learning_rate=args.dialogue_learning_rate, log=log_json)
        save_base(model.eval(), processor, folder / "model")
        return dict(steps=args.dialogue_steps, history=history)

    return cached(args.out / "base", build, dict(steps=args.dialogue_steps, data=args.dialogue_data,
                                                 learning_rate=args.dialogue_learning_rate),
                  earlier=dict(data="llava-v2", learning_rate=1e-3))


def base_answers_stage(args) -> dict | None:
    """How well the base (out/base/model) answers the held-out sets' single-question records (stages.base_vqa_exact):
    the dialogue it brings to `stamp-hf init`, stated in the card's account of the base (the trained model's VQA counts
    every question turn, a larger item set). Cached as out/base-answers with the base's settings, so a base built again
    otherwise is not scored by an old record. None when the base is not there to score (caches seeded from a summary
    that holds no such record)."""
    base, folder = args.out / "base" / "model", args.out / "base-answers"
    if not (folder / "result.json").exists() and not (base / "config.json").exists():
        return None
    data = data_folder(args.out, "v3")
    data_stage(args.out, args, "v3")

    def build(folder):
        model, processor = load_base(base)
        items = single_questions(data)
        return dict(records=len(items), exact=base_vqa_exact(model, processor, items))

    return cached(folder, build, dict(base=dict(steps=args.dialogue_steps, data=args.dialogue_data,
                                                learning_rate=args.dialogue_learning_rate)))


def stamp_stage(out: Path, name: str, data: Path, base: Path, steps: int, seed: int = 0, overrides=None,
                start_from: Path | None = None, learning_rate: float | None = None, threads: int | None = None,
                concurrent_runs: int = 1, extra_data=(), repeats=None, train_vision_tower: bool = False,
                files=TRAIN_FILES) -> dict:
    """`stamp-hf init` on the base, then `stamp-hf train` on the referring, dialogue and chat data of `data`; cached
    as out/<name>. `overrides`: config.json settings of an ablation variant, written into the initialised model.
    `start_from`: a trained STAMP model to go on training instead (no init), with a fresh schedule peaking at
    `learning_rate` (default TRAINING's). `threads`: the commands' torch threads; with `concurrent_runs` > 1 (runs
    side by side) their output goes to out/<name>/train.log. `extra_data`: more `data` entries of the train config
    (a .jsonl path or {path, repeat}), added to the mix. `repeats`: {file of TRAIN_FILES: how many times its records
    count}, the others once. `train_vision_tower`: the ViT and its merger train too (every build stage keeps them
    frozen; benchmarks/demo_vision_tower.py compares). `files`: the files of `data` it trains on (default the
    build's mix; benchmarks/demo_existence.py trains on one kind of question alone)."""
    folder = out / name
    result_file = folder / "result.json"
    learning_rate = learning_rate or TRAINING["learning_rate"]
    # the paths (start_from, extra_data) are recorded but not compared: within one --out the stage's name fixes them,
    # and a seeded cache (stamp_hf.synthetic.seed_caches) records the paths of the build it came from
    settings = dict(steps=steps, seed=seed, overrides=overrides or {}, repeats=repeats or {},
                    learning_rate=learning_rate, train_vision_tower=train_vision_tower)
    if result_file.exists():
        return same_settings(folder, json.loads(result_file.read_text()), settings)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "train.log" if concurrent_runs > 1 else None
    init = start_from or folder / "init"
    if not (init / "config.json").exists():
        cli("init", base, init, "--min-placeholders", 144, "--max-placeholders", 256, "--seed", seed, "--force",
            threads=threads, log=log)
        if overrides:
            config = json.loads((init / "config.json").read_text())
            (init / "config.json").write_text(json.dumps({**config, **overrides}, indent=2))
    config = dict(  # absolute paths: a train config's relative paths are read from its own folder
        model=str(init.resolve()),
        data=[train_entry(data / f, (repeats or {}).get(f, 1)) for f in files] + list(extra_data),
        output_dir=str((folder / "model").resolve()),
        trust_remote_code=True,
        freeze_vision_tower=not train_vision_tower,
        mask_loss_resolution="image",
        resume=any((folder / "model").glob("checkpoint-*")),
        training=dict(TRAINING, max_steps=steps, seed=seed, activation_checkpointing=False,
                      learning_rate=learning_rate),
    )
    (folder / "train.json").write_text(json.dumps(config, indent=2))
    parts = start_training_part(folder, config["resume"])
    start = time.perf_counter()
    cli("train", folder / "train.json", threads=threads, log=log)
    seconds = time.perf_counter() - start
    parts[-1].update(to_step=steps, seconds=seconds)
    state_file = folder / "model" / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    kept = [part["seconds"] for part in parts]
    result = dict(settings, start_from=str(start_from) if start_from else None, extra_data=list(extra_data),
                  seconds_this_run=seconds, seconds=None if None in kept else sum(kept),
                  parts=[{k: part[k] for k in ("from_step", "to_step", "seconds")} for part in parts],
                  threads=threads or torch.get_num_threads(), concurrent_runs=concurrent_runs,
                  log=[e for e in state.get("log_history", []) if "mask_loss" in e])
    result_file.write_text(json.dumps(result, indent=2))
    return result


def start_training_part(folder: Path, resume: bool) -> list[dict]:
    """Record in folder/parts.json that a `stamp-hf train` part of the stage starts now, from the checkpoint it resumes
    (step 0 without one), and close the part before it at that checkpoint: a stopped part's time is what it took to
    save the checkpoint the next part resumes from (the steps it ran past it are trained again), so that a resumed
    stage's time is its whole. A checkpoint no recorded part wrote (a build from before parts were recorded) gives an
    untimed part (seconds None). The parts so far, the new one last (without its seconds yet)."""
    parts_file = folder / "parts.json"
    checkpoint = Path(resume_checkpoint(True, folder / "model")) if resume else None
    # without a checkpoint every step is trained again: a part stopped before its first one counts for nothing
    parts = json.loads(parts_file.read_text()) if parts_file.exists() and checkpoint else []
    from_step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] if checkpoint else 0
    if checkpoint and parts and "seconds" not in parts[-1]:
        saved = (checkpoint / "trainer_state.json").stat().st_mtime  # Trainer writes it last
        parts[-1].update(to_step=from_step, seconds=max(0.0, saved - parts[-1]["started"]))
    elif checkpoint and not parts:
        parts.append(dict(from_step=0, to_step=from_step, seconds=None))
    parts.append(dict(from_step=from_step, started=time.time()))
    parts_file.write_text(json.dumps(parts, indent=2))
    return parts


def train_entry(path: Path, repeat: int = 1):
    """A train config's `data` entry: the absolute path, or {path, repeat} when its records count more than once."""
    return str(path.resolve()) if repeat == 1 else dict(path=str(path.resolve()), repeat=repeat)


def evaluate_both(model: Path, data: Path, folder: Path, limit=None) -> dict:
    """evaluate_demo on the test split and the drawn set, and scoring.evaluate_conversations (every turn of every
    record: VQA per kind, chat switches, multi-target answers) under "conversations"; cached in folder/<set>.json,
    which records `limit` (a cache made with another limit is evaluated again)."""
    from transformers import AutoModel, AutoProcessor

    results, loaded = {}, None
    for name, jsonl in (("test", data / "test.jsonl"), ("drawn", data / "drawn.jsonl")):
        result_file = folder / f"{name}.json"
        cached_result = json.loads(result_file.read_text()) if result_file.exists() else {}
        if cached_result.get("limit", "missing") != limit:
            loaded = loaded or (AutoModel.from_pretrained(model, trust_remote_code=True).eval(),
                                AutoProcessor.from_pretrained(model, trust_remote_code=True))
            start = time.perf_counter()
            metrics = evaluate_demo(*loaded, jsonl, folder / name, limit=limit)
            metrics["conversations"] = evaluate_conversations(*loaded, jsonl, limit=limit)
            metrics.update(limit=limit, seconds=time.perf_counter() - start)
            folder.mkdir(parents=True, exist_ok=True)
            result_file.write_text(json.dumps(metrics, indent=2))
        results[name] = json.loads(result_file.read_text())
    return results


def references(data: Path, processor_folder: Path) -> dict:
    """The language-blind baseline and the grid's ceiling on both sets, cached in data/references.json."""
    from transformers import AutoProcessor

    result_file = data / "references.json"
    if not result_file.exists():
        processor = AutoProcessor.from_pretrained(processor_folder, trust_remote_code=True)
        result = {name: {"blind": language_blind_baseline(data / f"{name}.jsonl"),
                         "ceiling": grid_ceiling(data / f"{name}.jsonl", processor)} for name in ("test", "drawn")}
        result_file.write_text(json.dumps(result, indent=2))
    return json.loads(result_file.read_text())


def spread(values) -> str:
    """Mean ± standard deviation of the figures that were measured (None: a set without such records)."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.mean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def results_table(results: dict, refs: dict) -> str:
    """Both held-out sets side by side: overall, per request form, per question kind, and the references."""
    test, drawn = results["test"], results["drawn"]
    rows = [("cIoU", "cIoU"), ("gIoU", "gIoU"), ("N-acc (absent targets: empty mask) %", "N-acc"),
            ("T-acc (present targets: a mask) %", "T-acc"), ("VQA exact %", "vqa_exact"),
            ("`<|seg|>` in segmentation answers %", "seg_rate"), ("no `<|seg|>` in VQA answers %", "no_seg_rate")]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["| | test split | drawn set |", "|---|---|---|"]
    lines += [f"| {title} | {fmt(test[key])} | {fmt(drawn[key])} |" for title, key in rows]
    for form in sorted(set(test["cIoU_by_form"]) | set(drawn["cIoU_by_form"])):
        lines.append(f"| cIoU, {form} | {fmt(test['cIoU_by_form'].get(form))} | {fmt(drawn['cIoU_by_form'].get(form))} |")
    for kind in sorted(set(test["vqa_by_kind"]) | set(drawn["vqa_by_kind"])):
        lines.append(f"| VQA exact, {kind} % | {fmt(test['vqa_by_kind'].get(kind))} | {fmt(drawn['vqa_by_kind'].get(kind))} |")
    lines.append(f"| language-blind baseline (every shape masked), cIoU | {refs['test']['blind']['cIoU']:.1f} | "
                 f"{refs['drawn']['blind']['cIoU']:.1f} |")
    lines.append(f"| best possible on the mask grid, cIoU | {refs['test']['ceiling']['cIoU']:.1f} | "
                 f"{refs['drawn']['ceiling']['cIoU']:.1f} |")
    lines.append(f"| samples: segmentation / VQA | {test['segmentation_samples']} / {test['vqa_samples']} | "
                 f"{drawn['segmentation_samples']} / {drawn['vqa_samples']} |")
    return "\n".join(lines)


def dialogue_table(results: dict) -> str:
    """Every assistant turn of both held-out sets (scoring.score_turns): VQA per kind, descriptions, chat switches
    per move, multi-target answers."""
    test, drawn = results["test"]["conversations"], results["drawn"]["conversations"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    row = lambda title, a, b: f"| {title} | {fmt(a)} | {fmt(b)} |"  # noqa: E731
    lines = ["| every turn of every record | test split | drawn set |", "|---|---|---|",
             row("VQA exact %", test["vqa_exact"], drawn["vqa_exact"])]
    for kind in sorted(set(test["vqa_by_kind"]) | set(drawn["vqa_by_kind"])):
        lines.append(row(f"VQA exact, {kind} %", test["vqa_by_kind"].get(kind), drawn["vqa_by_kind"].get(kind)))
    lines.append(row("descriptions naming every shape with its colour %", test["describe_names_every_shape"],
                     drawn["describe_names_every_shape"]))
    lines.append(row("chat: a later segmentation turn, every mask right (IoU >= 0.8) %", test["chat_switch"],
                     drawn["chat_switch"]))
    for move in sorted(set(test["chat_switch_by_move"]) | set(drawn["chat_switch_by_move"])):
        lines.append(row(f"chat switch, {move} %", test["chat_switch_by_move"].get(move),
                         drawn["chat_switch_by_move"].get(move)))
    lines.append(row("several targets: every mask right %", test["multi_all_right"], drawn["multi_all_right"]))
    for n in sorted(set(test["multi_by_targets"]) | set(drawn["multi_by_targets"])):
        lines.append(row(f"several targets, {n} of them: every mask right %", test["multi_by_targets"].get(n),
                         drawn["multi_by_targets"].get(n)))
    lines.append(row("several targets: labels name the targets %", test["multi_labels"], drawn["multi_labels"]))
    lines.append(f"| turns: VQA / chat switches / several targets | {test['vqa_samples']} / "
                 f"{test['chat_switch_samples']} / {test['multi_samples']} | {drawn['vqa_samples']} / "
                 f"{drawn['chat_switch_samples']} / {drawn['multi_samples']} |")
    return "\n".join(lines)


def ablation_table(runs: dict) -> str:
    """The Table 6 rows (mean ± std over seeds; one seed: its figure) and a line on how the runs were trained."""
    lines = ["| variant | seeds | test cIoU | per seed | test gIoU | drawn cIoU | drawn gIoU | test N-acc | "
             "test VQA exact |", "|---|---|---|---|---|---|---|---|---|"]
    for variant, (title, _) in VARIANTS.items():
        rows = runs.get(variant, [])
        if not rows:
            continue
        pick = lambda s, k: [r[s][k] for r in rows]  # noqa: E731
        lines.append(f"| {title} | {len(rows)} | {spread(pick('test', 'cIoU'))} | "
                     f"{' / '.join(f'{v:.1f}' for v in pick('test', 'cIoU'))} | {spread(pick('test', 'gIoU'))} | "
                     f"{spread(pick('drawn', 'cIoU'))} | {spread(pick('drawn', 'gIoU'))} | "
                     f"{spread(pick('test', 'N-acc'))} | {spread(pick('test', 'vqa_exact'))} |")
    training = [r["training"] for rows in runs.values() for r in rows if "training" in r]
    if training:
        minutes = [train_seconds(t) / 60 for t in training]
        lines += ["", f"Each run: `stamp-hf init` on the same base with the variant's config setting, then "
                      f"{training[0]['steps']} steps of batch 8 on the v3 data (seeds "
                      f"{', '.join(str(s) for s in sorted({t['seed'] for t in training}))}); "
                      f"{training[0]['concurrent_runs']} run(s) side by side, {training[0]['threads']} torch thread(s) "
                      f"each, {min(minutes):.1f}-{max(minutes):.1f} min a run{resumed_runs(training)}."]
    return "\n".join(lines)


def resumed_runs(training: list[dict]) -> str:
    """What the ablation line adds when some runs were stopped and resumed: how their time was counted."""
    resumed = [t for t in training if len(t.get("parts", [])) > 1]
    if not resumed:
        return ""
    untimed = sum(t.get("seconds") is None for t in resumed)
    how = (f"{untimed} of them with only the last part's time (an earlier part was not timed)" if untimed
           else "each part's time up to the checkpoint the next one resumed from")
    return f" ({len(resumed)} of the {len(training)} runs stopped and resumed: {how})"


def ablation_stage_name(variant: str, seed, steps) -> str:
    """The folder under --out of one ablation run (also what seed_caches names it by)."""
    return f"ablation-v3-{variant}-{seed}-{steps}"


def ablation_plan(args) -> list[tuple]:
    """(variant, seed, folder name, config overrides) of every Table 6 run --seeds asks for."""
    return [(variant, seed, ablation_stage_name(variant, seed, args.ablation_steps), overrides)
            for variant, (_, overrides) in VARIANTS.items() for seed in args.seeds]


def unseed_base_for_ablation(args) -> list[str]:
    """Ablation runs not yet cached start from out/base/model, which a seeded cache (seed_caches) records but does not
    hold: then the seeded base stages without their model (base; base-vision too when seeded without one) are removed,
    so that they are built again rather than the runs failing on a missing base. Only records marked seeded_from are
    removed; the folders removed."""
    to_train = [name for _, _, name, _ in ablation_plan(args) if not (args.out / name / "result.json").exists()]
    if not to_train or (args.out / "base" / "model" / "config.json").exists():
        return []
    removed = []
    for stage in ("base-vision", "base"):
        record = args.out / stage / "result.json"
        if (record.exists() and "seeded_from" in json.loads(record.read_text())
                and not (args.out / stage / "model" / "config.json").exists()):
            shutil.rmtree(args.out / stage)
            removed.append(stage)
    if removed:
        print(f"== ablation runs {', '.join(to_train)} start from the base, which the seeded cache does not hold: "
              f"building {' and '.join(removed)} again", flush=True)
    return removed


def ablation(args, data: Path) -> dict:
    """The Table 6 variants x --seeds from the same base, --ablation-jobs runs at a time (each with its share of
    --threads), then each run evaluated; {variant: [evaluate_both results with the run's "training" record, one per
    seed]}."""
    plan = ablation_plan(args)
    threads = max(1, args.threads // args.ablation_jobs)

    def train(run):
        _, seed, name, overrides = run
        return stamp_stage(args.out, name, data, args.out / "base" / "model", args.ablation_steps, seed, overrides,
                           threads=threads, concurrent_runs=args.ablation_jobs)

    with ThreadPoolExecutor(args.ablation_jobs) as pool:
        list(pool.map(train, plan))
    runs = {}
    for variant, _, name, _ in plan:
        training = json.loads((args.out / name / "result.json").read_text())
        training.pop("log")
        runs.setdefault(variant, []).append(dict(
            evaluate_both(args.out / name / "model", data, args.out / name / "eval", args.eval_limit),
            training=training))
    return runs


def rebalance_key(round_index: int) -> str:
    """The key of a rebalance round (0-based) in train_stage_names and, prefixed with "stamp_", in the timing."""
    return "rebalance" if round_index == 0 else f"rebalance_{round_index + 1}"


def train_stage_names(v2_steps, steps, conversation_steps=0, rebalance_steps=()) -> dict[str, str]:
    """The folders under --out of the build's `stamp-hf train` stages, each named after the chain it grows from:
    {"stamp_v2", "stamp", and "conversations" / one rebalance_key per round when they run}. `rebalance_steps`: the
    rounds' steps (one int: one round; 0: none). Also what seed_caches names them by."""
    names = {"stamp_v2": f"stamp-{v2_steps}", "stamp": f"stamp-{v2_steps}-v3-{steps}"}
    last = names["stamp"]
    if int(conversation_steps):
        last = names["conversations"] = f"{last}-conversations-{conversation_steps}"
    rounds = [rebalance_steps] if isinstance(rebalance_steps, (int, str)) else rebalance_steps
    for index, round_steps in enumerate(n for n in map(int, rounds) if n):
        last = names[rebalance_key(index)] = f"{last}-rebalance-{round_steps}"
    return names


def earlier_stages(args) -> dict:
    """The data, vision and dialogue stages and the first `stamp-hf train` (v2 data) the demo model grows from; each
    is built only when a later stage needs it and it is not cached."""
    first = args.out / train_stage_names(args.v2_steps, args.steps)["stamp_v2"]
    stages = json.loads((first / "result.json").read_text()).get("stages") if (first / "result.json").exists() else None
    if stages is None or args.ablation:
        if args.ablation:
            unseed_base_for_ablation(args)
        stages = dict(data=data_stage(args.out, args, "v2"),
                      vision=vision_stage(args.out, args.vision_steps, args.vision_targets))
        stages["dialogue"] = dialogue_stage(args)
    result = stamp_stage(args.out, first.name, data_folder(args.out, "v2"), args.out / "base" / "model", args.v2_steps)
    if "stages" not in result:
        result["stages"] = {k: v for k, v in stages.items() if k != "data"}
        (first / "result.json").write_text(json.dumps(result, indent=2))
    return dict(result["stages"], stamp_v2=result)


def argument_parser() -> argparse.ArgumentParser:
    """The build's settings (also how benchmarks/demo_dialogue.py finds the stages it shares)."""
    parser = argparse.ArgumentParser(prog="python -m stamp_hf.synthetic.build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="data, runs and results go here")
    parser.add_argument("--vision-steps", type=int, default=5000, help="steps of the vision stage (batch 16)")
    parser.add_argument("--vision-targets", nargs="+", choices=list(PATCH_ATTRIBUTES), default=list(SHAPE_TARGETS),
                        help="what the vision stage's probe tells on every patch (stages.PATCH_ATTRIBUTES)")
    parser.add_argument("--dialogue-steps", type=int, default=800, help="steps of the dialogue stage (batch 8)")
    parser.add_argument("--dialogue-data", choices=list(DIALOGUE_DATA_TEXT), default="llava-v2",
                        help="what the dialogue stage learns to answer (default: the shipped demo model's): "
                        + "; ".join(f"{name}: {source}, asking {kinds}" for name, (kinds, source) in DIALOGUE_DATA_TEXT.items()))
    parser.add_argument("--dialogue-learning-rate", type=float, default=1e-3,
                        help="peak learning rate of the dialogue stage (benchmarks/demo_dialogue.py compares some)")
    parser.add_argument("--v2-steps", type=int, default=8000,
                        help="steps of the first stamp-hf train, on the v2 data (batch 8)")
    parser.add_argument("--steps", type=int, default=8000,
                        help="steps of the second stamp-hf train, on the v3 data, from the first (batch 8)")
    parser.add_argument("--learning-rate", type=float, default=5e-4,
                        help="peak learning rate of the second and third train")
    parser.add_argument("--conversation-steps", type=int, default=5000,
                        help="steps of the third stamp-hf train, from the second, on the v3 data plus more questions, "
                             "chats and several-target requests (batch 8; 0: ship the second's model)")
    parser.add_argument("--conversation-samples", type=int, default=44000,
                        help="scenes drawn for the third train's extra data (its questions, chats and several-target "
                             "requests are kept: about 73 %%)")
    parser.add_argument("--rebalance-steps", type=int, nargs="+", default=[5000],
                        help="steps of the fourth stamp-hf train, from the third, on the third's mix with the referring "
                             "export counted twice and a peak learning rate half of --learning-rate (batch 8; 0: ship "
                             "the third's model); each further value: one more round on that mix, from the round "
                             "before, at half its peak learning rate (5000 6000: the second round measured in "
                             "benchmarks/results/demo_model_round2_attempt_cpu.json, not shipped)")
    parser.add_argument("--refer-scenes", type=int, default=8000, help="scenes of the gRefCOCO export (3 sentences each)")
    parser.add_argument("--dialogue-scenes", type=int, default=6000, help="scenes of the LLaVA export (3 turns each)")
    parser.add_argument("--chat-samples", type=int, default=8000, help="the generator's own conversations")
    parser.add_argument("--test-samples", type=int, default=400)
    parser.add_argument("--drawn-samples", type=int, default=400)
    parser.add_argument("--ablation", action="store_true", help="also train the Table 6 variants x --seeds (v3 data)")
    parser.add_argument("--ablation-steps", type=int, default=2500)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--ablation-jobs", type=int, default=1,
                        help="ablation runs trained side by side, each with --threads / jobs torch threads (a small "
                             "model uses more cores better as several runs than as more threads of one)")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N records of each set")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--ship", type=Path, help="write the trained demo model and its card here (a new folder)")
    return parser


def main(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.ship and args.ship.exists():
        parser.error(f"{args.ship} already exists; remove it first to replace the demo model")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    stages = earlier_stages(args)
    print("== vision", json.dumps(stages["vision"]["history"][-1]), f"{stages['vision']['seconds'] / 60:.1f} min")
    print("== dialogue", json.dumps(stages["dialogue"]["history"][-1]), f"{stages['dialogue']['seconds'] / 60:.1f} min")
    data_result = data_stage(args.out, args, "v3")
    data = data_folder(args.out, "v3")
    print("== data", json.dumps(data_result), flush=True)
    base_answers = base_answers_stage(args)
    if base_answers:
        print("== base answers (VQA exact %)", json.dumps(base_answers["exact"]), flush=True)
    names = train_stage_names(args.v2_steps, args.steps, args.conversation_steps, args.rebalance_steps)
    name = names["stamp"]
    stamp = stamp_stage(args.out, name, data, args.out / "base" / "model", args.steps,
                        start_from=args.out / names["stamp_v2"] / "model", learning_rate=args.learning_rate)
    timing = dict(vision=stages["vision"]["seconds"], dialogue=stages["dialogue"]["seconds"],
                  stamp_v2=train_seconds(stages["stamp_v2"]), stamp=train_seconds(stamp))
    conversations = None
    if args.conversation_steps:
        conversations = dict(data=conversations_stage(args.out, args.conversation_samples))
        print("== conversations", json.dumps(conversations["data"]), flush=True)
        start_from, name = args.out / name / "model", names["conversations"]
        conversations["train"] = stamp_stage(
            args.out, name, data, args.out / "base" / "model", args.conversation_steps, start_from=start_from,
            learning_rate=args.learning_rate,
            extra_data=[str(conversations_file(args.out).resolve())])
        timing["stamp_conversations"] = train_seconds(conversations["train"])
    rebalance = []
    for index, round_steps in enumerate(n for n in args.rebalance_steps if n):
        start_from, name = args.out / name / "model", names[rebalance_key(index)]
        rebalance.append(stamp_stage(
            args.out, name, data, args.out / "base" / "model", round_steps, start_from=start_from,
            learning_rate=args.learning_rate / 2 ** (index + 1), repeats=REBALANCE_REPEATS,
            extra_data=[str(conversations_file(args.out).resolve())] if conversations else []))
        timing[f"stamp_{rebalance_key(index)}"] = train_seconds(rebalance[-1])
    model = args.out / name / "model"
    results = evaluate_both(model, data, args.out / name / "eval", args.eval_limit)
    refs = references(data, model)
    steps = " + ".join(str(n) for n in (args.v2_steps, args.steps, args.conversation_steps, *args.rebalance_steps) if n)
    print(f"\nDemo model: {steps} steps of stamp-hf train; training time (min): "
          + ", ".join(f"{k} {v / 60:.1f}" for k, v in timing.items()) + f", total {sum(timing.values()) / 60:.1f}")
    print(f"CPU: {os.cpu_count()} cores visible, {args.threads} torch threads; Python {sys.version.split()[0]}\n")
    print(results_table(results, refs))
    print()
    print(dialogue_table(results))
    runs = {}
    if args.ablation:
        runs = ablation(args, data)
        print(f"\nTable 6 at this scale: each run {args.ablation_steps} steps from the same base\n")
        print(ablation_table(runs))
    summary = dict(data=data_result, vision=stages["vision"], dialogue=stages["dialogue"], base_answers=base_answers,
                   stamp_v2=stages["stamp_v2"],
                   stamp=stamp, conversations=conversations, rebalance=rebalance, results=results, references=refs,
                   timing_seconds=timing,
                   ablation=runs,
                   args={k: str(v) for k, v in vars(args).items()})
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.ship:
        write_demo_card(model, args.ship, summary, results_table(results, refs) + "\n\n" + dialogue_table(results),
                        ablation_table(runs) if runs else None)
        print(f"\ndemo model written to {args.ship}")
    return summary


if __name__ == "__main__":
    main()
