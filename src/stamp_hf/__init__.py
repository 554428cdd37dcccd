"""stamp-hf: STAMP segmentation MLLM on transformers' Qwen2-VL.

The model code lives in the top-level `*_stamp.py` files (the Hub remote code); this package reaches them through
symlinks, so there is one copy. Importing it registers STAMP with the Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_stamp import STAMP_TOKENS, STAMPConfig
from .modeling_stamp import STAMPGenerateOutput, STAMPModel, STAMPOutput
from .processing_stamp import STAMPProcessor
from .vocab import add_stamp_tokens
from .data import STAMPCollator, STAMPDataset
from .evaluation import evaluate
from .training import STAMPTrainer, TrainConfig, train

__version__ = "0.1.0"

AutoConfig.register(STAMPConfig.model_type, STAMPConfig, exist_ok=True)
AutoModel.register(STAMPConfig, STAMPModel, exist_ok=True)
AutoModelForImageTextToText.register(STAMPConfig, STAMPModel, exist_ok=True)
AutoProcessor.register(STAMPConfig, STAMPProcessor, exist_ok=True)
# save_pretrained then writes auto_map and the remote-code files, so the folder loads without this package.
STAMPConfig.register_for_auto_class()
STAMPModel.register_for_auto_class("AutoModel")
STAMPProcessor.register_for_auto_class()

__all__ = [
    "STAMP_TOKENS",
    "STAMPConfig",
    "STAMPGenerateOutput",
    "STAMPModel",
    "STAMPOutput",
    "STAMPProcessor",
    "add_stamp_tokens",
    "STAMPCollator",
    "STAMPDataset",
    "STAMPTrainer",
    "TrainConfig",
    "evaluate",
    "train",
]
