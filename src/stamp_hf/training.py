"""Fine-tuning STAMP with transformers' Trainer: L = L_text + L_mask, both logged; full fine-tuning or LoRA (peft).

The config file (YAML or JSON) of `stamp-hf train CONFIG` / `train(config)`:

    model: org/stamp-2b             # a STAMP checkpoint (folder or Hub id); the processor is read from it too. Or a
                                    # Qwen2-VL / Qwen2.5-VL base (e.g. Qwen/Qwen2-VL-2B-Instruct): training then starts
                                    # from init_from_base(model) (stamp_hf.init_base), an untrained STAMP head
    min_placeholders: null          # with a base only: bounds on N per image (null: the paper's 1024 / 1280)
    max_placeholders: null
    data: data/train.jsonl          # the JSON Lines training format (stamp_hf.data); a list of files reads as one;
                                    # an entry {path: refer.jsonl, repeat: 3} counts that file's records 3 times
    eval_data: data/val.jsonl       # optional, same format: eval_loss at every checkpoint (or once at the end)
    output_dir: runs/stamp-2b-ft    # checkpoints, then the final model (a plain STAMP checkpoint, also after LoRA)
    finetuning: full                # full | lora
    freeze_vision_tower: false      # true: the ViT (and its merger) keeps its weights; the rest trains
    lora: {rank: 64, alpha: 128, dropout: 0.05}   # the paper's LoRA (7B): all linear layers; classifier and the
                                    # STAMP token rows trained in full
    text_loss_weight: null          # L = text_loss_weight * L_text + L_mask; null keeps the checkpoint's (paper: 1)
    mask_loss_weights: null         # [bce, dice]; null keeps the checkpoint's; "official" = [0.3, 0.7]
    mask_loss_resolution: null      # patch (the paper) | image: the loss on the upsampled masks; null keeps the checkpoint's
    soft_mask_labels: null          # true: targets are each cell's foreground fraction; null keeps the checkpoint's
    resume: false                   # true: from the newest complete checkpoint in output_dir; or a checkpoint folder
    training:                       # any transformers.TrainingArguments field; the paper's values are the defaults
      num_train_epochs: 3
      per_device_train_batch_size: 4

Multi-process: run the same command under `accelerate launch` or `torchrun`; add `deepspeed: configs/ds_zero2.json`
under `training` for the paper's ZeRO-2 setup, `deepspeed: configs/ds_zero3.json` for ZeRO-3, or `fsdp: true` with
`fsdp_config: configs/fsdp_full_shard.json` for FSDP2 (GPUs only). The output is the same plain STAMP checkpoint.
"""

import json
import logging as stdlib_logging
import os
import re
import shutil
import tempfile
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor, PreTrainedModel, Trainer, TrainingArguments, set_seed
from transformers.utils import logging

from .checkpoints import load_weights_in_place, with_lora
from .configuration_stamp import MASK_LOSS_RESOLUTIONS, STAMP_MODEL_TYPES
from .data import STAMPCollator, STAMPDataset
from .processing_stamp import default_mask_resample
from .repo_ids import REPO_ID
from .init_base import BASE_TYPES, base_model_type, init_from_base

logger = logging.get_logger(__name__)


class _CheckpointOrderNotice(stdlib_logging.Filter):
    """Trainer orders checkpoints by modification time, and when two were written within a second (any short run)
    it says "mtime may not be reliable on this filesystem" and orders them by step, which is right: nothing to act
    on. This drops exactly that record."""

    def filter(self, record):
        return "mtime may not be reliable on this filesystem" not in record.getMessage()


logging.get_logger("transformers.trainer_utils").addFilter(_CheckpointOrderNotice())

# The paper's optimisation settings (Table S1); batch size 96 = devices x per_device x gradient_accumulation.
PAPER_TRAINING_ARGUMENTS = {
    "learning_rate": 3e-5,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.03,  # a float < 1 is a fraction of the total steps: 3% warm-up
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "max_grad_norm": 1.0,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "activation_checkpointing": True,  # gradient checkpointing
    "activation_checkpointing_kwargs": {"use_reentrant": False},
    "logging_steps": 10,
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "report_to": "none",
    "remove_unused_columns": False,  # mask_labels is not a tensor column
}
OFFICIAL_MASK_LOSS_WEIGHTS = (0.3, 0.7)  # BCE, Dice: the released training code's weights (the paper writes 1 + 1)


@dataclass
class LoraSettings:
    rank: int = 64
    alpha: int = 128
    dropout: float = 0.05


@dataclass
class TrainConfig:
    """What `stamp-hf train` reads from its config file; see the module docstring for the file format."""

    model: str
    data: str | list
    output_dir: str
    eval_data: str | list[str] | None = None
    finetuning: str = "full"
    freeze_vision_tower: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    text_loss_weight: float | None = None
    mask_loss_weights: list | str | None = None
    mask_loss_resolution: str | None = None
    soft_mask_labels: bool | None = None
    resume: bool | str = False
    dtype: str = "float32"  # the weights the optimizer updates; mixed precision comes from training.bf16
    trust_remote_code: bool = False
    min_placeholders: int | None = None
    max_placeholders: int | None = None
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.finetuning not in ("full", "lora"):
            raise ValueError(f"finetuning must be 'full' or 'lora', got {self.finetuning!r}")
        if self.freeze_vision_tower not in (True, False):
            raise ValueError(f"freeze_vision_tower must be true or false, got {self.freeze_vision_tower!r}")
        if isinstance(self.lora, dict):
            unknown = set(self.lora) - {f.name for f in fields(LoraSettings)}
            if unknown:
                raise ValueError(f"unknown lora setting(s) {sorted(unknown)}; known: rank, alpha, dropout")
            self.lora = LoraSettings(**self.lora)
        if self.text_loss_weight is not None and (
            isinstance(self.text_loss_weight, bool) or not isinstance(self.text_loss_weight, (int, float))
            or not self.text_loss_weight >= 0
        ):
            raise ValueError(f"text_loss_weight must be a number >= 0 or null, got {self.text_loss_weight!r}")
        if self.mask_loss_weights == "official":
            self.mask_loss_weights = list(OFFICIAL_MASK_LOSS_WEIGHTS)
        elif self.mask_loss_weights is not None and (
            not isinstance(self.mask_loss_weights, (list, tuple)) or len(self.mask_loss_weights) != 2
        ):
            raise ValueError(f"mask_loss_weights must be [bce, dice], 'official' or null, got {self.mask_loss_weights!r}")
        if self.mask_loss_resolution not in (None, *MASK_LOSS_RESOLUTIONS):
            raise ValueError(
                f"mask_loss_resolution must be one of {MASK_LOSS_RESOLUTIONS} or null, got {self.mask_loss_resolution!r}"
            )
        if self.soft_mask_labels not in (None, True, False):
            raise ValueError(f"soft_mask_labels must be true, false or null, got {self.soft_mask_labels!r}")
        # parsed once here (not dataclass fields: the saved config keeps the settings as given)
        self.train_sources = data_sources(self.data, "data")
        self.eval_sources = data_sources(self.eval_data, "eval_data") if self.eval_data is not None else []
        if any(times != 1 for _, times in self.eval_sources):
            raise ValueError("eval_data: repeat is for the training data only (an evaluation counts each record once)")
        known = {f.name for f in fields(TrainingArguments)}
        unknown = sorted(set(self.training) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}: 'training' takes TrainingArguments fields")
        if "output_dir" in self.training:
            raise ValueError("set output_dir at the top level of the config, not under 'training'")
        self.training = {key: training_value(key, value) for key, value in self.training.items()}

    @classmethod
    def from_file(cls, path, overrides: list[str] = ()) -> "TrainConfig":
        """The config file at `path`, with `overrides` ("key=value", "training.key=value": a dotted key, a YAML
        value) applied on top, as `stamp-hf train CONFIG --set ...` gives them."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such config file: {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as error:
                raise ValueError(f"{path}: not valid YAML ({error})") from None
        else:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the config must be a mapping of settings")
        for override in overrides:
            apply_override(raw, override)
        cls.check_settings(raw, where=f"{path}: ")
        # relative paths in the file are relative to the file, so a config runs from any directory
        def resolve(value):
            return value if Path(value).is_absolute() else str((path.parent / value).resolve())

        def resolve_entry(entry):  # a data file, or {path: FILE, repeat: N}
            return dict(entry, path=resolve(entry["path"])) if isinstance(entry, dict) and "path" in entry else (
                resolve(entry) if isinstance(entry, (str, Path)) else entry)

        for key in ("data", "output_dir", "eval_data"):
            if isinstance(raw.get(key), list):  # several data files, read as one data set
                raw[key] = [resolve_entry(value) for value in raw[key]]
            elif raw.get(key) is not None:
                raw[key] = resolve_entry(raw[key])
        def beside_config(value):  # a model folder or DeepSpeed file next to the config; else a Hub id / as given
            return str((path.parent / value).resolve()) if isinstance(value, str) and (path.parent / value).exists() else value

        raw["model"] = beside_config(raw["model"])
        training = raw.get("training") or {}
        for key in ("deepspeed", "fsdp_config"):  # engine settings files, e.g. configs/ds_zero2.json
            if key in training:
                training[key] = beside_config(training[key])
        return cls(**raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        """The settings of a dict, as a config file gives them (the same one-line errors)."""
        cls.check_settings(raw)
        return cls(**raw)

    @classmethod
    def check_settings(cls, raw: dict, where: str = "") -> None:
        """The required settings are there and every key is one; a TrainingArguments field at the top level is told
        to go under training:."""
        missing = [name for name in ("model", "data", "output_dir") if name not in raw]
        if missing:
            raise ValueError(f"{where}missing required setting(s) {missing}")
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        misplaced = [key for key in unknown if key in {f.name for f in fields(TrainingArguments)}]
        if misplaced:
            raise ValueError(f"{where}{misplaced[0]} is a TrainingArguments setting: put it under training:")
        if unknown:
            raise ValueError(f"{where}unknown setting(s) {unknown}")

    def check_paths(self) -> None:
        """The model and data the settings name exist (a Hub id is looked up when it loads), named by setting, before
        anything loads."""
        model = str(self.model)
        if Path(model).expanduser().is_file():
            raise ValueError(f"model {model} is a file; give the checkpoint's folder (config.json, *.safetensors) or a "
                             "Hub repo id")
        if not Path(model).expanduser().exists() and not REPO_ID.fullmatch(model):
            raise FileNotFoundError(f"model {model}: no such folder (nor a Hub repo id)")
        for key, sources in (("data", self.train_sources), ("eval_data", self.eval_sources)):
            for file, _ in sources:
                if Path(file).is_dir():
                    raise ValueError(f"{key} {file} is a folder; give the .jsonl file")
                if not Path(file).is_file():
                    raise FileNotFoundError(f"{key} {file}: no such data file")

    def training_arguments(self) -> TrainingArguments:
        settings = dict(PAPER_TRAINING_ARGUMENTS)
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            settings["bf16"] = True
        settings["dataloader_pin_memory"] = torch.cuda.is_available()  # pinned memory only helps (and only works
        # without a warning) when batches go to a GPU; the config's own value below wins
        settings.update(self.training)
        if self.eval_data is not None:
            # unless set: eval_loss where checkpoints are saved ("no": once at the end, in train), and the loss only,
            # not the (tokens x vocabulary) logits of the whole evaluation set
            settings.setdefault("prediction_loss_only", True)
            settings.setdefault("eval_strategy", settings["save_strategy"])
            settings.setdefault("eval_steps", settings.get("save_steps", TrainingArguments.save_steps))
        return TrainingArguments(output_dir=self.output_dir, **settings)


def data_sources(value, key: str) -> list[tuple[str, int]]:
    """(file, repeat) per entry of a `data` / `eval_data` setting: a file, or {path: FILE, repeat: N} (the file's
    records counted N times, N a whole number >= 1), alone or in a list."""
    sources = []
    for entry in value if isinstance(value, list) else [value]:
        if isinstance(entry, (str, Path)):
            sources.append((str(entry), 1))
        elif (isinstance(entry, dict) and set(entry) <= {"path", "repeat"} and isinstance(entry.get("path"), (str, Path))
              and type(entry.get("repeat", 1)) is int and entry.get("repeat", 1) >= 1):
            sources.append((str(entry["path"]), entry.get("repeat", 1)))
        else:
            raise ValueError(f"{key} entry {entry!r}: give a .jsonl file or {{path: FILE, repeat: N}} "
                             "(N a whole number >= 1)")
    if not sources:
        raise ValueError(f"{key}: no data files given")
    return sources


def training_value(key: str, value):
    """A `training:` value as its TrainingArguments field types it: YAML reads `1e-4` as a string, and "10" or 10.0
    are fine steps. A value that cannot be converted is a one-line error naming the setting and the type."""
    annotation = typing.get_type_hints(TrainingArguments).get(key)
    kinds = set(typing.get_args(annotation) or (annotation,))
    if value is None or str in kinds or not kinds & {bool, int, float}:
        return value
    if bool in kinds:
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if isinstance(value, bool) or str(value).strip().lower() in words:
            return value if isinstance(value, bool) else words[str(value).strip().lower()]
        raise ValueError(f"training.{key} must be true or false, got {value!r}")
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or (int in kinds and float not in kinds and not number.is_integer()):
        kind = "an integer" if float not in kinds else "a number"
        raise ValueError(f"training.{key} must be {kind}, got {value!r}")
    return int(number) if float not in kinds else number


def apply_override(raw: dict, override: str) -> None:
    """Set one "dotted.key=value" override (the value read as YAML: 10, 1e-4, true, [a, b]) in the raw config."""
    import yaml

    key, separator, text = override.partition("=")
    if not separator or not key.strip():
        raise ValueError(f"--set {override}: expected KEY=VALUE, e.g. training.max_steps=10")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    *parents, name = key.strip().split(".")
    target = raw
    for parent in parents:
        target = target.setdefault(parent, {})
        if not isinstance(target, dict):
            raise ValueError(f"--set {override}: {parent} is not a group of settings")
    target[name] = value


class STAMPTrainer(Trainer):
    """Trainer on the model's own loss, `outputs.loss` = text_loss_weight * L_text + L_mask, that also logs the two
    parts, unweighted, as `text_loss` and `mask_loss`.

    Both parts are normalised over the whole accumulated, all-process batch: L_text by its label tokens (Trainer's
    `num_items_in_batch`), L_mask by its masks (`num_masks_in_batch`, counted here the same way and passed to the model
    with each micro-batch), so accumulation and several processes give the loss of the full batch.

    Resuming loads the checkpoint's weights through `from_pretrained` (see `_load_from_checkpoint`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._parts = None
        self._parts_since_step = 0

    def _get_num_items_in_batch(self, batch_samples: list, device):
        tokens = super()._get_num_items_in_batch(batch_samples, device)
        if tokens is not None and self.model_accepts_loss_kwargs:
            masks = torch.tensor(sum(len(m) for batch in batch_samples for m in batch["mask_labels"]), device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                masks = self.accelerator.gather(masks).sum()
            for batch in batch_samples:
                batch["num_masks_in_batch"] = masks
        return tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            if num_items_in_batch is None:  # per-micro-batch means: Trainer divides by the accumulation steps
                scale = 1 / self.current_gradient_accumulation_steps
            else:  # shares of the global batch; Trainer multiplies by the processes, as DDP averages their gradients
                scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            text = outputs.text_loss if outputs.text_loss is not None else outputs.mask_loss.new_zeros(())
            parts = torch.stack([text.detach(), outputs.mask_loss.detach()]) * scale
            if self._parts is None:  # the first step since the last log, or since the run (re)started
                self._parts, self._parts_since_step = parts, self.state.global_step
            else:
                self._parts = self._parts + parts
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time=None):
        if "loss" in logs and self._parts is not None:
            steps = max(self.state.global_step - self._parts_since_step, 1)
            text, mask = (self.accelerator.gather(self._parts[None]).mean(0) / steps).tolist()
            logs = {**logs, "text_loss": text, "mask_loss": mask}
            self._parts = None
        super().log(logs, start_time)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Trainer reloads a checkpoint's weights with `load_state_dict` under the keys as saved, but `save_pretrained`
        writes the released (legacy Qwen2-VL) key layout: resuming then kept the starting weights, with only a warning.
        A plain model gets the checkpoint's safetensors weights copied in place, one tensor at a time, the keys renamed
        as `from_pretrained` renames them (load_weights_in_place: no second model in memory), and must match every
        weight. LoRA adapters, DeepSpeed and FSDP states load as Trainer loads them."""
        target = self.model if model is None else model
        folder = Path(resume_from_checkpoint)
        weights = ("model.safetensors", "model.safetensors.index.json")
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if sharded or not isinstance(target, PreTrainedModel) or not any((folder / name).is_file() for name in weights):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights_in_place(target, folder)


def apply_lora(model, settings: LoraSettings | None = None, freeze_vision_tower: bool = False):
    """The paper's LoRA: adapters on every linear layer (language model and vision tower, unless it is frozen); the
    mask classifier and the embedding rows (and untied lm_head rows) of the STAMP tokens trained in full, so
    `<|seg|>` can be learned."""
    from peft import LoraConfig

    settings = settings or LoraSettings()
    stamp_ids = [getattr(model.config, f"{name}_token_id") for name in ("seg", "mask", "yes", "no")]
    trainable_rows = {"embed_tokens": stamp_ids}
    if not model.config.tie_word_embeddings:
        trainable_rows["lm_head"] = stamp_ids
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules="all-linear",
        exclude_modules=r"(.*\.)?(classifier|visual(\..*)?)" if freeze_vision_tower else ["classifier"],
        modules_to_save=["classifier"],
        trainable_token_indices=trainable_rows,
    )
    return with_lora(model, config)


def merge_and_save(model, processor, folder, state_dict: dict | None = None) -> Path:
    """Save a plain STAMP checkpoint (safetensors + config + processor + remote code): LoRA weights merged in.
    `state_dict`: the full weights when `model` itself holds only a shard of them (ZeRO-3, FSDP)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.config.use_cache = True  # the Trainer turns it off while training; the checkpoint is for generation
    if state_dict is not None:  # gathered from shards, tied weights come as copies: one tensor again, saved once
        state_dict = dict(state_dict)
        for target, source in getattr(model, "all_tied_weights_keys", {}).items():
            if target in state_dict and source in state_dict:
                state_dict[target] = state_dict[source]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".final.partial-*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".final.partial-", dir=folder))
    model.save_pretrained(staging, state_dict=state_dict)
    processor.save_pretrained(staging)
    # moved in with config.json last: a run killed here leaves no config.json, so its folder is not taken for a
    # finished model, and `resume: true` finishes it from the last checkpoint
    for file in sorted(staging.iterdir(), key=lambda path: path.name == "config.json"):
        os.replace(file, folder / file.name)
    staging.rmdir()
    return folder


def keep_used_renamings(model) -> None:
    """Keep on `model` only the checkpoint key renamings its loading applied, which save_pretrained reverses. A normal
    load keeps only those; transformers' ZeRO-3 loader (5.25) keeps all, legacy ones too, and the saved keys would
    come out renamed twice ("model.model.layers...") instead of those one process saves."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is not None:
        model._weight_conversions = [conversion for conversion in conversions if conversion.was_used()]


def shards_weights(args: TrainingArguments) -> bool:
    """Whether each process holds only a shard of the weights while training: FSDP, or DeepSpeed ZeRO-3."""
    zero3 = args.deepspeed and args.hf_deepspeed_config.is_zero3()
    return bool(args.fsdp or zero3)


def join_deepspeed_comm(args: TrainingArguments) -> None:
    """Attach deepspeed.comm to the running process group before the model loads. ZeRO-3 partitions the weights
    while from_pretrained builds them (deepspeed.zero.Init), in a world it reads from deepspeed.comm; on GPUs
    accelerate starts deepspeed.comm, but with `use_cpu` it starts only torch.distributed (gloo), and ZeRO-3 would
    then see one process."""
    if not args.deepspeed or args.world_size == 1:
        return
    from deepspeed import comm

    if not comm.is_initialized():
        comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def full_state_dict(trainer: Trainer) -> dict | None:
    """The whole model's weights, gathered from the processes' shards (FSDP, ZeRO-3) on the main process; None when
    every process holds them all. Every process must call it: the gathering is collective."""
    if not shards_weights(trainer.args):
        return None
    return trainer.accelerator.get_state_dict(trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model)


def load_starting_point(config: TrainConfig):
    """(model, processor) to train from: the STAMP checkpoint `config.model`, or, when it names a Qwen2-VL /
    Qwen2.5-VL base, a STAMP made from it by `init_from_base` (said on the log)."""
    dtype = getattr(torch, config.dtype)
    bounds = {k: getattr(config, k) for k in ("min_placeholders", "max_placeholders") if getattr(config, k) is not None}
    if base_model_type(config.model) in BASE_TYPES:
        logger.warning(f"{config.model} is a base model, not a STAMP checkpoint: training starts from "
                       f"init_from_base({config.model!r}) (its weights, the STAMP tokens, an untrained mask classifier)")
        return init_from_base(config.model, dtype=dtype, **bounds)
    if bounds:
        raise ValueError("min_placeholders / max_placeholders apply when model is a base; a STAMP checkpoint keeps its own")
    processor = AutoProcessor.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    model = AutoModel.from_pretrained(config.model, dtype=dtype, trust_remote_code=config.trust_remote_code)
    if getattr(model.config, "model_type", None) not in STAMP_MODEL_TYPES:
        raise ValueError(f"{config.model} is not a STAMP checkpoint (model_type {model.config.model_type!r})")
    return model, processor


def train(config: TrainConfig | dict | str | Path) -> STAMPTrainer:
    """Fine-tune a STAMP checkpoint as `config` says (a TrainConfig, a dict of its fields, or a config file) and save
    the result to `config.output_dir` as a plain STAMP checkpoint. Returns the Trainer (its `state.log_history` holds
    loss, text_loss and mask_loss per logging step)."""
    if isinstance(config, (str, Path)):
        config = TrainConfig.from_file(config)
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    config.check_paths()
    output_dir = Path(config.output_dir)
    if (output_dir / "config.json").exists() and not config.resume:
        raise FileExistsError(f"{output_dir} already holds a model; choose another output_dir or set resume: true")
    created = not output_dir.exists()
    try:
        return _train(config, output_dir)
    except BaseException:
        # a run that failed before its first checkpoint leaves no output folder behind (one it can resume from stays)
        if created and output_dir.is_dir() and not any(output_dir.glob("checkpoint-*")):
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def is_complete_checkpoint(folder: Path) -> bool:
    """Whether Trainer finished writing the checkpoint folder: it writes trainer_state.json last, after the weights,
    optimizer, scheduler and RNG states, straight into checkpoint-N (no temporary name). A folder without it, or with
    it cut short, is one a killed run was writing."""
    try:
        return "global_step" in json.loads((Path(folder) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def resume_checkpoint(resume: bool | str, output_dir: Path) -> str | None:
    """The checkpoint to resume from: None for `resume: false`, the folder given, or for `true` the newest complete
    checkpoint-N in output_dir (transformers' own choice is the highest N, even a half-written one). Said on the log
    when a newer, incomplete one is passed over; the resumed run writes that step's checkpoint again."""
    if not resume:
        return None
    if resume is not True:
        if not is_complete_checkpoint(resume):
            raise FileNotFoundError(f"resume: {resume} is not a complete checkpoint (no readable trainer_state.json)")
        return str(resume)
    numbered = [(int(match[1]), path) for path in output_dir.glob("checkpoint-*")
                if (match := re.fullmatch(r"checkpoint-(\d+)", path.name)) and path.is_dir()]  # fmt: skip
    incomplete = []
    for _, folder in sorted(numbered, reverse=True):
        if is_complete_checkpoint(folder):
            if incomplete:
                logger.warning(f"{', '.join(incomplete)} in {output_dir} is incomplete (its save was interrupted): "
                               f"resuming from {folder.name}")
            return str(folder)
        incomplete.append(folder.name)
    raise FileNotFoundError(f"resume: true, but {output_dir} holds no complete checkpoint to resume from")


def _train(config: TrainConfig, output_dir: Path) -> STAMPTrainer:
    args = config.training_arguments()
    if config.finetuning == "lora" and shards_weights(args):
        raise ValueError("finetuning: lora merges the adapter into whole weights at the end; train it with DDP or "
                         "DeepSpeed ZeRO-2 (configs/ds_zero2.json), not with FSDP or ZeRO-3, which shard them")
    if args.fsdp and args.device.type == "cpu":  # accelerate would run plain DDP instead, and say nothing
        raise ValueError("training.fsdp needs GPUs (or another accelerator): accelerate applies FSDP to accelerator "
                         "processes only, and this run is on the CPU")
    resume = resume_checkpoint(config.resume, output_dir)
    join_deepspeed_comm(args)
    # what Trainer does before its model_init: the random parts made here (LoRA's A matrices, a fresh classifier) come
    # from the run's seed, not from whatever the process drew before, so every process and rerun starts alike
    set_seed(args.seed)
    model, processor = load_starting_point(config)
    keep_used_renamings(model)  # so that checkpoints and the final model are saved under the names one process uses
    if config.text_loss_weight is not None:
        model.config.text_loss_weight = float(config.text_loss_weight)
    if config.mask_loss_weights is not None:
        model.config.bce_loss_weight, model.config.dice_loss_weight = (float(w) for w in config.mask_loss_weights)
    if config.soft_mask_labels is not None:
        model.config.soft_mask_labels = config.soft_mask_labels
    if config.mask_loss_resolution is not None:
        model.config.mask_loss_resolution = config.mask_loss_resolution
    resolution = model.config.mask_loss_resolution
    processor.mask_resample = default_mask_resample(resolution)  # the saved processor post-processes as trained
    if config.finetuning == "lora":
        model = apply_lora(model, config.lora, config.freeze_vision_tower)
    elif config.freeze_vision_tower:
        model.model.visual.requires_grad_(False)

    files, repeats = (list(column) for column in zip(*config.train_sources))
    trainer = STAMPTrainer(
        model=model,
        args=args,
        train_dataset=STAMPDataset(files, processor, resolution, repeats=repeats),
        eval_dataset=STAMPDataset([f for f, _ in config.eval_sources], processor, resolution)
        if config.eval_sources else None,
        data_collator=STAMPCollator(processor),
    )
    trainer.train(resume_from_checkpoint=resume)
    if config.eval_data and args.eval_strategy == "no":
        trainer.evaluate()
    state_dict = full_state_dict(trainer)
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        if config.finetuning == "lora":  # keep the adapter too: small, and loadable on the base checkpoint
            model.save_pretrained(output_dir / "adapter")
        merge_and_save(model, processor, output_dir, state_dict)
        trainer.state.save_to_json(output_dir / "trainer_state.json")  # log_history: loss, text_loss, mask_loss
        (output_dir / "stamp_train_config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    trainer.accelerator.wait_for_everyone()
    return trainer


__all__ = [
    "OFFICIAL_MASK_LOSS_WEIGHTS",
    "PAPER_TRAINING_ARGUMENTS",
    "LoraSettings",
    "STAMPTrainer",
    "TrainConfig",
    "apply_lora",
    "is_complete_checkpoint",
    "load_starting_point",
    "merge_and_save",
    "resume_checkpoint",
    "train",
]
