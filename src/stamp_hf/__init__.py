"""stamp-hf: STAMP segmentation MLLM on transformers' Qwen2-VL and Qwen2.5-VL.

The model code lives in the top-level `*_stamp.py` files (the Hub remote code); this package reaches them through
symlinks, so there is one copy. Importing the package is light (the `stamp-hf` console script's --help needs no
torch): its names load on first use. Importing the model code through the package (any of the names below, or any
stamp_hf module that uses the model) registers STAMP with the Auto classes and the pipeline registry.
"""

import importlib
import logging

__version__ = "0.1.0"


class _TorchaoEnumNotice(logging.Filter):
    """torchao (the `quant` extra), which transformers imports with its model code whenever it is installed, calls
    torch's deprecated `register_constant` on two Enums at import, and torch logs a notice for each on stderr: nothing a
    STAMP user can act on (torchao's to fix). This drops exactly those records of that one logger."""

    def filter(self, record):
        return "is an Enum subclass and is now natively supported by torch.compile" not in record.getMessage()


logging.getLogger("torch.utils._pytree").addFilter(_TorchaoEnumNotice())  # at package import: before transformers'


class _DeepSpeedCpuNotice(logging.Filter):
    """DeepSpeed (the `deepspeed` extra), which transformers imports with its model-loading code whenever it is
    installed, logs "Setting accelerator to CPU" on every process of a machine without a GPU, and on stdout, where it
    would corrupt `--json` output. It says nothing a CPU user can act on; this drops exactly that record."""

    def filter(self, record):
        return not record.getMessage().startswith("Setting accelerator to CPU.")


logging.getLogger("DeepSpeed").addFilter(_DeepSpeedCpuNotice())

# public name -> the stamp_hf module that defines it
_EXPORTS = {
    "STAMP_TOKENS": "configuration_stamp",
    "STAMPConfig": "configuration_stamp",
    "STAMPQwen2_5_VLConfig": "configuration_stamp",
    "STAMPGenerateOutput": "modeling_stamp",
    "STAMPModel": "modeling_stamp",
    "STAMPOutput": "modeling_stamp",
    "STAMPQwen2_5_VLModel": "modeling_stamp",
    "STAMP_MODELS": "modeling_stamp",
    "BaseModelError": "init_base",
    "init_from_base": "init_base",
    "STAMPProcessor": "processing_stamp",
    "load_image": "processing_stamp",
    "add_stamp_tokens": "vocab",
    "PIPELINE_TASK": "pipeline_stamp",
    "STAMPSegmentationPipeline": "pipeline_stamp",
    "SegmentAnythingRefiner": "sam_stamp",
    "TransformersSamRefiner": "sam_stamp",
    "sam_refiner": "sam_stamp",
    "CheckpointError": "checkpoints",
    "convert_checkpoint": "convert",
    "load_checkpoint": "convert",
    "push_folder": "hub",
    "render_model_card": "hub",
    "Conversation": "conversation",
    "STAMPCollator": "data",
    "STAMPDataset": "data",
    "STAMPTrainer": "training",
    "TrainConfig": "training",
    "evaluate": "evaluation",
    "prepare_data": "prepare",
    "train": "training",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stamp_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
