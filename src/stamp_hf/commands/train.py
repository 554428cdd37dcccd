"""Fine-tune a STAMP checkpoint on JSON Lines data with transformers' Trainer (full or LoRA), as CONFIG says.

CONFIG is a YAML or JSON file: model (a STAMP checkpoint, or a Qwen2-VL / Qwen2.5-VL base to start from an untrained
STAMP head, then with optional min_placeholders / max_placeholders), data, output_dir, and optionally eval_data,
finetuning (full | lora), lora, freeze_vision_tower, the loss settings (text_loss_weight, mask_loss_weights,
mask_loss_resolution, soft_mask_labels), resume and training (TrainingArguments fields; the paper's values are the
defaults); stamp_hf.training documents each. Run it under `accelerate launch` or `torchrun` for several processes.
The result in output_dir is a plain STAMP checkpoint."""

from pathlib import Path

from stamp_hf.cli import CommandError


def add_arguments(parser):
    parser.add_argument("config", type=Path, help="the training config file (.yaml, .yml or .json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of CONFIG (dotted for nested ones, the value read as YAML), e.g. "
                        "--set training.max_steps=10 --set model=./my-stamp; repeatable (default: the file as it is)")


def run(args) -> int:
    from ._checks import check_exists

    if check_exists(args.config, "CONFIG", "config file").is_dir():  # before torch loads
        raise CommandError(f"CONFIG {args.config} is a folder; give the .yaml, .yml or .json file")
    from stamp_hf.training import TrainConfig, train

    train(TrainConfig.from_file(args.config, args.overrides))
    return 0
