"""What converting a released checkpoint, making a STAMP from a base and training share: where a checkpoint is (a
folder or a Hub id), its config and weight shapes read without loading, its STAMP configuration, the checks on a
load, and folders written all or nothing. Weights load only from safetensors unless the caller allows pickles
(`PICKLED_WEIGHTS`, the one list of pickled suffixes, is the remote code's)."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import AutoImageProcessor
from transformers.conversion_mapping import get_checkpoint_conversion_mapping

from .configuration_stamp import STAMP_CONFIGS
from .modeling_stamp import PICKLED_WEIGHTS
from .repo_ids import REPO_ID

# a backbone's or a STAMP model type -> the STAMP configuration class
CONFIG_CLASSES = {**STAMP_CONFIGS, **{config.model_type: config for config in STAMP_CONFIGS.values()}}


class CheckpointError(ValueError):
    """The source is not a checkpoint we can use; the message names the file and the problem."""


def write_folder(destination: Path, write) -> Path:
    """Build a folder with `write(staging)` next to `destination`, then rename it into place: a failure leaves
    nothing half-written. Whatever is at `destination` (checked by the caller) is replaced only once the new folder
    is complete."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        write(staging)
        if destination.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
            os.replace(destination, old / "old")
            os.replace(staging, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


def is_repo_id(source) -> bool:
    return isinstance(source, str) and not Path(source).exists() and bool(REPO_ID.fullmatch(source))


def resolve_checkpoint(source, allow_pickle, revision, token) -> Path:
    """A local folder as is; a repo id through the Hub cache (offline mode uses what is cached)."""
    path = Path(source)
    if path.is_dir():
        return path
    if not is_repo_id(source):
        raise CheckpointError(f"{source} is neither a folder nor a Hub repo id ([org/]name)")
    patterns = ["*.json", "*.txt", "*.jinja", "*.model", "*.safetensors"]
    patterns += [f"*{suffix}" for suffix in PICKLED_WEIGHTS] if allow_pickle else []
    try:
        return Path(snapshot_download(source, revision=revision, token=token, allow_patterns=patterns))
    except Exception as error:  # the Hub client's errors say what went wrong (not found, offline, gated)
        raise CheckpointError(f"cannot fetch {source}: {error}".splitlines()[0]) from None


def read_config(folder: Path, name="config.json") -> dict:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not a STAMP or Qwen2-VL checkpoint: it has no config.json or adapter_config.json"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def weight_shapes(folder: Path, allow_pickle: bool, prefix: str = "") -> dict[str, tuple] | None:
    """{key: shape} of the safetensors weights in `folder` (without loading them); None if only pickled weights exist
    and the user allowed them."""
    files = sorted(folder.glob(f"{prefix}*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_WEIGHTS)
        if not pickled:
            raise CheckpointError(f"{folder} has no weights (no .safetensors file)")
        if not allow_pickle:
            raise CheckpointError(
                f"{folder} holds only pickled weights ({', '.join(pickled)}), which can run code when loaded; "
                "re-save them as safetensors, or pass allow_pickle=True (--allow-pickle) if you trust the source"
            )
        return None
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def stamp_config(
    config_dict: dict,
    folder: Path,
    placeholders: dict,
    accepted: tuple,
    expected: str,
):
    """The STAMP configuration of a Qwen-VL config.json (flat legacy or nested text_config) whose model_type is one
    of `accepted` (`expected` says which, in the error)."""
    model_type = config_dict.get("model_type")
    if model_type not in accepted:
        raise CheckpointError(f"{folder}/config.json has model_type {model_type!r}: {expected}")
    settings = {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures", "auto_map")}
    settings.pop("transformers_version", None)
    settings.update(placeholders)
    try:
        return CONFIG_CLASSES[model_type](**settings)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{folder}/config.json is not a valid {model_type} config: {error}".splitlines()[0]) from None


def load_image_processor(folders):
    for folder in folders:
        if (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file():
            try:
                return AutoImageProcessor.from_pretrained(folder)
            except Exception as error:
                raise CheckpointError(f"cannot load the image processor of {folder}: {error}".splitlines()[0]) from None
    raise CheckpointError(f"no image processor (preprocessor_config.json) in {', '.join(map(str, folders))}")


def check_loading(info: dict, folder: Path, allowed_missing: tuple = ()) -> None:
    """Every weight of the model found in the checkpoint and nothing left over (`allowed_missing`: key prefixes)."""
    problems = {
        "missing": sorted(k for k in info["missing_keys"] if not allowed_missing or not k.startswith(allowed_missing)),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": sorted(str(m[0]) if isinstance(m, tuple) else str(m) for m in info["mismatched_keys"]),
    }
    details = [f"{len(keys)} {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
               for kind, keys in problems.items() if keys]  # fmt: skip
    if details:
        raise CheckpointError(f"the weights in {folder} do not fit a Qwen-VL model with its config: {'; '.join(details)}")


def current_weight_name(key: str, model_type: str) -> str:
    """A saved weight's name as a model of `model_type` names it: legacy Qwen2-VL names (`model.layers.*`,
    `visual.*`, what `save_pretrained` writes) renamed with the transforms `from_pretrained` applies."""
    for transform in get_checkpoint_conversion_mapping(model_type) or ():
        key, _ = transform.rename_source_key(key)
    return key


def load_weights_in_place(model, folder: Path) -> None:
    """Copy the safetensors weights of a checkpoint `folder` (one file or shards) into `model`, one tensor at a time:
    a resumed run needs no second model in memory. Every weight of the model must come from the checkpoint (tied
    weights through the one they share storage with) and every saved weight must fit one, in name and shape."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(read_config(folder, index.name)["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    weights = model.state_dict()
    loaded = set()
    with torch.no_grad():
        for file in files:
            with safe_open(folder / file, "pt") as saved:
                for key in saved.keys():
                    name = current_weight_name(key, model.config.model_type)
                    target = weights.get(name)
                    shape = tuple(saved.get_slice(key).get_shape())
                    if target is None or tuple(target.shape) != shape:
                        raise CheckpointError(f"{folder / file}: {key} {list(shape)} fits no weight of the model")
                    target.copy_(saved.get_tensor(key))
                    loaded.add(target.data_ptr())
    missing = sorted(name for name, tensor in weights.items() if tensor.data_ptr() not in loaded)
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} weight(s) of the model ({', '.join(missing[:3])})")


def with_lora(model, lora_config):
    """peft's `get_peft_model`, without the FutureWarning peft triggers itself: its PeftModel reads the model's
    `is_gradient_checkpointing`, which transformers 5 renamed (is_activation_checkpointing); nothing a user can act on."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora_config)


__all__ = [
    "CONFIG_CLASSES",
    "CheckpointError",
    "check_loading",
    "is_repo_id",
    "load_image_processor",
    "read_config",
    "resolve_checkpoint",
    "stamp_config",
    "weight_shapes",
    "with_lora",
    "write_folder",
]
