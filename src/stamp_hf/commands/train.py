"""Fine-tune a STAMP checkpoint on JSON Lines data with transformers' Trainer (full or LoRA), as CONFIG says.

CONFIG is a YAML or JSON file: model, data, output_dir, and optionally finetuning (full | lora), lora, mask_loss_weights,
resume and training (TrainingArguments fields; the paper's values are the defaults). Run it under `accelerate launch`
or `torchrun` for several processes. The result in output_dir is a plain STAMP checkpoint."""

from pathlib import Path


def add_arguments(parser):
    parser.add_argument("config", type=Path, help="the training config file (.yaml, .yml or .json)")


def run(args) -> int:
    from stamp_hf.training import train

    train(args.config)
    return 0
