"""Training through transformers' Trainer: a tiny model overfits tiny data, LoRA merges into a plain checkpoint,
activation checkpointing changes nothing but memory, and `stamp-hf train` reads its config file."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_isolated
from shapes_data import one_thread, SHAPES, shape_mask, write_shapes_dataset  # noqa: F401 (fixture)
from stamp_hf.cli import main as cli
from stamp_hf.data import STAMPCollator, STAMPDataset
from stamp_hf.testing import tiny_stamp
from stamp_hf.training import TrainConfig, apply_lora, train

FAST = {"learning_rate": 3e-3, "warmup_steps": 0, "save_strategy": "no", "use_cpu": True, "logging_steps": 1, "seed": 0}


@pytest.fixture
def base(tmp_path, request):
    """A tiny random STAMP checkpoint on disk (Qwen2-VL, or the backbone a test passes as the fixture's parameter) and
    the shapes data set."""
    model, processor = tiny_stamp(seed=0, backbone=getattr(request, "param", "qwen2_vl"))
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    return tmp_path / "base", write_shapes_dataset(tmp_path / "data")


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_tiny_model_overfits_tiny_data_through_stamp_hf_train(base, tmp_path):
    checkpoint, data = base
    config = tmp_path / "train.yaml"
    config.write_text(
        f"model: {checkpoint}\ndata: {data}\noutput_dir: out\n"
        f"training: {json.dumps(dict(FAST, num_train_epochs=60, per_device_train_batch_size=4))}\n"
    )
    assert cli(["train", str(config)]) == 0
    out = tmp_path / "out"  # relative to the config file
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    dataset = STAMPDataset(data, processor)
    batch = STAMPCollator(processor)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        outputs = model(**batch)
    sizes = [size for size, *_ in SHAPES]
    masks = processor.post_process_masks(outputs.mask_logits, target_sizes=sizes)
    for (size, box, *_), (mask,) in zip(SHAPES, masks):
        assert iou(mask.numpy(), shape_mask(size, box)) > 0.9
    # the text loss fell: the trained model's L_text (and L_mask) on these samples is far below the untrained one
    first = tiny_stamp(seed=0)[0]
    with torch.no_grad():
        start = first(**batch)
    assert outputs.text_loss < 0.2 * start.text_loss
    assert outputs.mask_loss < 0.2 * start.mask_loss


def test_trainer_logs_text_and_mask_loss_and_their_weighted_sum(base, tmp_path):
    checkpoint, data = base
    trainer = train(dict(model=str(checkpoint), data=str(data), output_dir=str(tmp_path / "out"),
                         text_loss_weight=2.5, mask_loss_weights="official", soft_mask_labels=True,
                         mask_loss_resolution="image",
                         training=dict(FAST, max_steps=4, per_device_train_batch_size=2)))
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 4
    for entry in steps:
        assert entry["text_loss"] > 0 and entry["mask_loss"] > 0
        assert entry["loss"] == pytest.approx(2.5 * entry["text_loss"] + entry["mask_loss"], rel=1e-5)
    assert steps[-1]["loss"] < steps[0]["loss"]
    # the output folder holds a plain checkpoint, and a second run there is refused instead of overwriting it
    assert (tmp_path / "out" / "model.safetensors").exists()
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["bce_loss_weight"], saved["dice_loss_weight"], saved["soft_mask_labels"]) == (0.3, 0.7, True)
    assert saved["text_loss_weight"] == 2.5
    assert saved["mask_loss_resolution"] == "image"
    assert saved.get("use_cache", True) is True  # saved for generation, not as the Trainer left it
    with pytest.raises(FileExistsError, match="already holds a model"):
        train(dict(model=str(checkpoint), data=str(data), output_dir=str(tmp_path / "out")))


def test_activation_checkpointing_gives_the_same_training(base, tmp_path):
    checkpoint, data = base
    curves = []
    for checkpointing in (False, True):
        trainer = train(dict(model=str(checkpoint), data=str(data), output_dir=str(tmp_path / f"out{checkpointing}"),
                             training=dict(FAST, max_steps=3, per_device_train_batch_size=2,
                                           activation_checkpointing=checkpointing)))
        assert trainer.model.is_activation_checkpointing == checkpointing
        curves.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-5)


def test_lora_trains_the_paper_modules():
    model, _ = tiny_stamp(seed=0)
    peft_model = apply_lora(model)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    lora = peft_model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (64, 128, 0.05)
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert any("embed_tokens.token_adapter" in n for n in trainable)
    assert not model.config.tie_word_embeddings and any("lm_head.token_adapter" in n for n in trainable)  # untied
    for part in ("visual.blocks.0.attn.qkv", "language_model.layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"):
        assert any(part in n and "lora_A" in n for n in trainable), part
    # everything else is frozen: trainable parameters are a small share of the model
    total = sum(p.numel() for p in peft_model.parameters())
    assert not any("lora" in n for n in trainable if "classifier" in n)
    assert sum(p.numel() for n, p in peft_model.named_parameters() if n in trainable) < total


def test_freeze_vision_tower_keeps_the_vit_and_trains_the_rest(base, tmp_path):
    checkpoint, data = base
    before = load_file(checkpoint / "model.safetensors")
    train(dict(model=str(checkpoint), data=str(data), output_dir=str(tmp_path / "out"), freeze_vision_tower=True,
               training=dict(FAST, max_steps=3, per_device_train_batch_size=2)))
    after = load_file(tmp_path / "out" / "model.safetensors")
    vision = [name for name in before if name.startswith("visual.")]  # saved in the released (legacy) key layout
    assert vision and all(torch.equal(before[name], after[name]) for name in vision)
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("model.layers.0."))
    # with LoRA the vision tower gets no adapters at all
    peft_model = apply_lora(tiny_stamp(seed=0)[0], freeze_vision_tower=True)
    adapted = {name for name, _ in peft_model.named_modules() if name.endswith("lora_A")}
    assert adapted and not [name for name in adapted if ".visual." in name]
    assert any("language_model.layers.0.self_attn.q_proj" in name for name in adapted)
    assert any("classifier.modules_to_save" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="freeze_vision_tower must be true or false, got 'yes'"):
        TrainConfig(model="m", data="d", output_dir="/tmp/x", freeze_vision_tower="yes")


@pytest.mark.parametrize("base", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"], indirect=True)
def test_lora_merges_into_a_plain_checkpoint_with_the_adapter_outputs(base, tmp_path):
    checkpoint, data = base
    train(dict(model=str(checkpoint), data=str(data), output_dir=str(tmp_path / "out"), finetuning="lora",
               training=dict(FAST, max_steps=5, per_device_train_batch_size=2)))
    merged = tmp_path / "out"
    # the unmerged adapter on the base checkpoint, in this process
    from peft import PeftModel
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(merged)
    dataset = STAMPDataset(data, processor)
    batch = STAMPCollator(processor)([dataset[0], dataset[1]])
    tensors = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "batch.safetensors")
    adapter = PeftModel.from_pretrained(AutoModel.from_pretrained(checkpoint), merged / "adapter").eval()
    base_model = AutoModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        want = adapter(**batch)
        before = base_model(**batch)
    # the merged checkpoint, in a fresh interpreter without stamp_hf (Hub remote code only)
    run_isolated(
        f"""
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(merged)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ in ("STAMPModel", "STAMPQwen2_5_VLModel", "STAMPQwen3VLModel"), type(model)
        batch = load_file({str(tmp_path / "batch.safetensors")!r})
        with torch.no_grad():
            out = model(**batch, mask_labels=[torch.zeros(1, 1, 1)] * 2)
        grids = {{f"mask{{i}}": row[0].contiguous() for i, row in enumerate(out.mask_logits)}}
        save_file(dict(grids, logits=out.logits.contiguous()), {str(tmp_path / "merged.safetensors")!r})
        """,
        tmp_path,
    )
    got = load_file(tmp_path / "merged.safetensors")
    torch.testing.assert_close(got["logits"], want.logits, atol=1e-4, rtol=1e-4)
    for i in range(2):
        torch.testing.assert_close(got[f"mask{i}"], want.mask_logits[i][0], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(got[f"mask{i}"], before.mask_logits[i][0], atol=1e-3)  # the adapter did change them


def test_config_errors_are_one_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    cases = {
        "model: m\ndata: d\n": "missing required setting(s) ['output_dir']",
        "model: m\ndata: d\noutput_dir: o\nepochs: 3\n": "unknown setting(s) ['epochs']",
        "model: m\ndata: d\noutput_dir: o\ntraining: {lr: 1}\n": "unknown training setting(s) ['lr']",
        "model: m\ndata: d\noutput_dir: o\nfinetuning: qlora\n": "finetuning must be 'full' or 'lora'",
        "model: m\ndata: [d, {path: e, repeat: 0}]\noutput_dir: o\n": "give a .jsonl file or {path: FILE, repeat: N}",
        "model: m\ndata: [{file: e}]\noutput_dir: o\n": "data entry {'file': 'e'}: give a .jsonl file",
        "model: m\ndata: d\noutput_dir: o\neval_data: {path: e, repeat: 2}\n": "eval_data: repeat is for the training",
    }
    for text, message in cases.items():
        config.write_text(text)
        assert cli(["train", str(config)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert cli(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_a_repeated_data_file_counts_its_records_that_many_times_in_training(base, tmp_path):
    """`data: [a.jsonl, {path: b.jsonl, repeat: 3}]` mixes sources as the released training does (referring data x 3):
    the data set holds b's records three times, each the same item, and training goes through all of them."""
    checkpoint, data = base
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    once = STAMPDataset(data, processor)
    mixed = STAMPDataset([data, data], processor, repeats=[1, 3])
    assert len(mixed) == 4 * len(once)
    last = len(once) - 1
    for index in (last, 2 * len(once) + last, 3 * len(once) + last):
        assert torch.equal(mixed[index]["input_ids"], once[last]["input_ids"])
        assert torch.equal(mixed[index]["mask_labels"], once[last]["mask_labels"])
    with pytest.raises(ValueError, match="repeats must be one whole number >= 1 per data file"):
        STAMPDataset([data], processor, repeats=[2, 1])
    (tmp_path / "sub").mkdir()
    config = tmp_path / "sub" / "train.yaml"  # the repeated entry's path is read from the config's folder too
    config.write_text(f"model: {checkpoint}\ndata: [{data}, {{path: ../data/{data.name}, repeat: 3}}]\n"
                      f"output_dir: out\ntraining: {json.dumps(dict(FAST, max_steps=1, per_device_train_batch_size=1))}\n")
    assert cli(["train", str(config)]) == 0
    state = json.loads((tmp_path / "sub" / "out" / "trainer_state.json").read_text())
    assert state["log_history"][0]["epoch"] == pytest.approx(1 / len(mixed))


def test_paper_defaults_and_official_loss_weights():
    config = TrainConfig(model="m", data="d", output_dir="/tmp/x", mask_loss_weights="official")
    args = config.training_arguments()
    assert (args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps) == (3e-5, "linear", 0.03)
    assert (args.weight_decay, args.max_grad_norm, args.adam_beta1, args.adam_beta2) == (0.0, 1.0, 0.9, 0.999)
    assert config.mask_loss_weights == [0.3, 0.7]
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (64, 128, 0.05)
    assert config.soft_mask_labels is None and config.text_loss_weight is None  # the checkpoint's own are kept
    for weight in ("heavy", -1, True):
        with pytest.raises(ValueError, match=f"text_loss_weight must be a number >= 0 or null, got {weight!r}"):
            TrainConfig(model="m", data="d", output_dir="/tmp/x", text_loss_weight=weight)
    with pytest.raises(ValueError, match="soft_mask_labels must be true, false or null, got 'yes'"):
        TrainConfig(model="m", data="d", output_dir="/tmp/x", soft_mask_labels="yes")
    assert config.mask_loss_resolution is None
    with pytest.raises(ValueError, match="mask_loss_resolution must be one of .* or null, got 'grid'"):
        TrainConfig(model="m", data="d", output_dir="/tmp/x", mask_loss_resolution="grid")


def test_shipped_recipes_parse_and_use_zero2():
    from pathlib import Path

    configs = Path(__file__).parent.parent / "configs"
    zero2 = json.loads((configs / "ds_zero2.json").read_text())
    assert zero2["zero_optimization"]["stage"] == 2
    # batch, accumulation and clipping come from TrainingArguments ("auto"), so the YAML is the one source
    assert all(zero2[k] == "auto" for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                             "gradient_clipping"))
    full = TrainConfig.from_file(configs / "stamp-2b-refcoco.yaml")
    lora = TrainConfig.from_file(configs / "stamp-7b-lora.yaml")
    assert full.finetuning == "full" and lora.finetuning == "lora"
    for config in (full, lora):
        assert config.training["deepspeed"] == str((configs / "ds_zero2.json").resolve())
        batch = config.training["per_device_train_batch_size"] * config.training["gradient_accumulation_steps"]
        assert batch * 8 == 96  # the paper's batch on 8 GPUs
    assert lora.training["learning_rate"] == 2e-5 and full.training["learning_rate"] == 3e-5


def test_readme_data_and_config_examples_are_valid(tmp_path):
    import re
    from pathlib import Path

    from stamp_hf.data import load_mask, read_records

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Fine-tuning and evaluation")[1].split("\n## ")[0]
    (tmp_path / "data.jsonl").write_text(re.search(r"```jsonl\n(.*?)```", section, re.S).group(1))
    records = read_records(tmp_path / "data.jsonl")
    assert [len(r.masks) for r in records] == [1, 2, 1, 0, 1]
    assert load_mask(records[1].masks[1], (320, 240), tmp_path, "readme").sum() == 80 * 100  # the RLE is real
    (tmp_path / "train.yaml").write_text(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    config = TrainConfig.from_file(tmp_path / "train.yaml")
    assert config.finetuning == "full" and config.training["num_train_epochs"] == 3
    assert config.training_arguments().learning_rate == 3e-5


def test_training_resumes_from_its_last_checkpoint(base, tmp_path):
    checkpoint, data = base
    config = dict(model=str(checkpoint), data=str(data), output_dir=str(tmp_path / "out"),
                  training=dict(FAST, max_steps=2, per_device_train_batch_size=2, save_strategy="steps", save_steps=2))
    train(config)
    state_file = tmp_path / "out" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"][0]["loss"] = 123.0  # a mark that only a resumed run can carry
    state_file.write_text(json.dumps(state))
    trainer = train(dict(config, resume=True, training=dict(config["training"], max_steps=4)))
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    assert sorted(losses) == [1, 2, 3, 4] and losses[1] == 123.0  # steps 1-2 from the checkpoint, 3-4 trained now


def test_eval_data_gives_eval_loss_at_each_checkpoint_or_once_at_the_end(base, tmp_path):
    checkpoint, data = base
    config = tmp_path / "train.yaml"  # eval_data relative to the config file, like data
    config.write_text(f"model: {checkpoint}\ndata: {data}\neval_data: {data.relative_to(tmp_path)}\noutput_dir: out\n"
                      f"training: {json.dumps(dict(FAST, max_steps=4, per_device_train_batch_size=2))}\n")
    assert TrainConfig.from_file(config).eval_data == str(data.resolve())
    trainer = train(TrainConfig.from_file(config))  # save_strategy "no": one evaluation, after training
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [4]
    trainer = train(dict(model=str(checkpoint), data=str(data), eval_data=str(data), output_dir=str(tmp_path / "o2"),
                         training=dict(FAST, max_steps=4, per_device_train_batch_size=2, save_strategy="steps",
                                       save_steps=2, per_device_eval_batch_size=2)))
    evals = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    assert sorted(evals) == [2, 4]
    assert evals[4] < evals[2]  # evaluated on the training samples: the loss falls
    # the evaluation loss is the trained model's own L_text + L_mask on those samples, batch by batch
    from transformers import AutoProcessor

    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    dataset = STAMPDataset(data, processor)
    batches = [STAMPCollator(processor)([dataset[i], dataset[i + 1]]) for i in range(0, len(dataset), 2)]
    with torch.no_grad():
        losses = [model(**batch).loss.item() for batch in batches]
    assert evals[4] == pytest.approx(np.mean(losses), rel=1e-4)


@pytest.mark.parametrize("base", ["qwen2_vl", "qwen3_vl"], indirect=True)
def test_gradient_accumulation_follows_the_curve_of_the_full_batch(base, tmp_path):
    """Token-normalised L_text and per-<|seg|> L_mask are scaled so that 2 x 2 accumulated samples equal a batch of 4
    (the samples have different lengths, so a per-micro-batch mean would differ). On Qwen3-VL too, whose own class
    tells Trainer that it takes no loss kwargs."""
    checkpoint, data = base
    curves = []
    for per_device, accumulation in ((4, 1), (2, 2)):
        trainer = train(dict(model=str(checkpoint), data=str(data), output_dir=str(tmp_path / f"out{accumulation}"),
                             training=dict(FAST, max_steps=4, per_device_train_batch_size=per_device,
                                           gradient_accumulation_steps=accumulation)))
        curves.append([[e[k] for k in ("loss", "text_loss", "mask_loss")] for e in trainer.state.log_history if "loss" in e])
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-4, atol=1e-5)


def test_config_values_are_converted_to_their_training_argument_types_and_overridable(tmp_path):
    """YAML reads 1e-4 as a string: it becomes the float TrainingArguments wants; `--set` overrides a setting; a
    value that cannot be converted, or a TrainingArguments field at the top level, is one line naming it."""
    from stamp_hf.training import TrainConfig

    path = tmp_path / "train.yaml"
    path.write_text("model: m\ndata: d.jsonl\noutput_dir: out\ntraining:\n  learning_rate: 1e-4\n  max_steps: '20'\n")
    config = TrainConfig.from_file(path, ["training.max_steps=10", "training.bf16=false", "finetuning=lora"])
    assert config.training["learning_rate"] == 1e-4 and isinstance(config.training["learning_rate"], float)
    assert config.training["max_steps"] == 10 and config.training["bf16"] is False
    assert config.finetuning == "lora"
    assert TrainConfig.from_file(path).training["max_steps"] == 20
    with pytest.raises(ValueError, match=r"^training.learning_rate must be a number, got 'fast'$"):
        TrainConfig.from_file(path, ["training.learning_rate=fast"])
    with pytest.raises(ValueError, match=r"^training.max_steps must be an integer, got 2.5$"):
        TrainConfig.from_file(path, ["training.max_steps=2.5"])
    path.write_text("model: m\ndata: d.jsonl\noutput_dir: out\nlearning_rate: 1e-4\n")
    with pytest.raises(ValueError, match="learning_rate is a TrainingArguments setting: put it under training:"):
        TrainConfig.from_file(path)
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        TrainConfig.from_file(tmp_path / "train.yaml", ["max_steps"])


def test_a_config_error_leaves_no_output_folder(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    config = tmp_path / "train.yaml"
    config.write_text(f"model: {tmp_path / 'no_such_model'}\ndata: d.jsonl\noutput_dir: out\n")
    script = Path(sys.executable).with_name("stamp-hf")
    result = subprocess.run([str(script), "train", str(config), "--set", "training.max_steps=1"], capture_output=True,
                            text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()
