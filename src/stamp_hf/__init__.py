"""stamp-hf: STAMP segmentation MLLM on transformers' Qwen2-VL and Qwen2.5-VL.

The model code lives in the top-level `*_stamp.py` files (the Hub remote code); this package reaches them through
symlinks, so there is one copy. Importing it registers STAMP with the Auto classes and the pipeline registry.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_stamp import STAMP_TOKENS, STAMPConfig, STAMPQwen2_5_VLConfig
from .convert import CheckpointError, convert_checkpoint, load_checkpoint
from .data import STAMPCollator, STAMPDataset
from .evaluation import evaluate
from .hub import push_folder, render_model_card
from .init_base import BaseModelError, init_from_base
from .modeling_stamp import STAMP_MODELS, STAMPGenerateOutput, STAMPModel, STAMPOutput, STAMPQwen2_5_VLModel
from .pipeline_stamp import PIPELINE_TASK, STAMPSegmentationPipeline
from .processing_stamp import STAMPProcessor
from .sam_stamp import SegmentAnythingRefiner, TransformersSamRefiner, sam_refiner
from .training import STAMPTrainer, TrainConfig, train
from .vocab import add_stamp_tokens

__version__ = "0.1.0"

for _model_class in STAMP_MODELS.values():  # STAMPModel (Qwen2-VL), STAMPQwen2_5_VLModel
    _config_class = _model_class.config_class
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModel.register(_config_class, _model_class, exist_ok=True)
    AutoModelForImageTextToText.register(_config_class, _model_class, exist_ok=True)
    AutoProcessor.register(_config_class, STAMPProcessor, exist_ok=True)
    # save_pretrained then writes auto_map and the remote-code files, so the folder loads without this package.
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModel")
STAMPProcessor.register_for_auto_class()
# Importing modeling_stamp also registered the "stamp-segmentation" pipeline task (pipeline_stamp.register_pipeline).


__all__ = [
    "STAMP_TOKENS",
    "STAMPConfig",
    "STAMPGenerateOutput",
    "STAMPModel",
    "STAMPOutput",
    "STAMPQwen2_5_VLConfig",
    "STAMPQwen2_5_VLModel",
    "STAMP_MODELS",
    "BaseModelError",
    "init_from_base",
    "STAMPProcessor",
    "add_stamp_tokens",
    "PIPELINE_TASK",
    "STAMPSegmentationPipeline",
    "SegmentAnythingRefiner",
    "TransformersSamRefiner",
    "sam_refiner",
    "CheckpointError",
    "convert_checkpoint",
    "load_checkpoint",
    "push_folder",
    "render_model_card",
    "STAMPCollator",
    "STAMPDataset",
    "STAMPTrainer",
    "TrainConfig",
    "evaluate",
    "train",
]
