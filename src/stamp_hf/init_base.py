"""Make a STAMP model from a Qwen-VL base: `init_from_base` (and `stamp-hf init`).

The base is a Hub id or folder of a transformers Qwen2-VL, Qwen2.5-VL or Qwen3-VL (dense or MoE) checkpoint as the Hub repos lay them out
(config.json with flat legacy or nested text settings, legacy or current weight names, tied or untied embeddings,
tokenizer files, chat template, preprocessor_config.json). As the official training code does it: the four STAMP
tokens are appended in one `add_special_tokens` call, the embeddings (and an untied lm_head) are resized to
len(tokenizer) and a Linear(hidden, 1) classifier is added. The base's weights are not touched otherwise, so on text
without the new tokens the result gives the base's logits.
"""

import contextlib
import json
from pathlib import Path

import torch
from transformers.utils import logging

from .configuration_stamp import STAMP_CONFIGS, STAMP_MODEL_TYPES, STAMP_TOKENS
from . import checkpoints
from .checkpoints import CheckpointError
from .hub import render_model_card, save_for_hub
from .modeling_stamp import STAMP_MODELS
from .processing_stamp import STAMPProcessor
from .vocab import add_stamp_tokens

BASE_TYPES = tuple(STAMP_CONFIGS)  # qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe
EXPECTED_BASE = f"a base must be Qwen2-VL, Qwen2.5-VL or Qwen3-VL (model_type {', '.join(map(repr, BASE_TYPES))})"


class BaseModelError(CheckpointError):
    """The base cannot be made into a STAMP model; the message names the base and the reason."""


def init_from_base(
    base,
    output=None,
    min_placeholders: int = 1024,
    max_placeholders: int = 1280,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    dtype="auto",
    seed: int = 0,
    repo_id: str | None = None,
    max_shard_size="5GB",
    revision: str | None = None,
    token: str | None = None,
):
    """A STAMP model and processor made from `base` (Hub id or folder of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint), with
    an untrained STAMP head; written to `output` as a STAMP Hub folder (remote code, model card) if given.

    min_placeholders / max_placeholders: the bounds on N (merged patches per image; the paper's 1024 / 1280).
    force: replace an existing `output` (only once the new folder is complete). allow_pickle: accept a base with
    only pickled weights (loading them can run code). dtype: of the loaded weights ("auto": the base's). seed: of
    the classifier's initialisation, N(0, initializer_range) with bias 0 (transformers' default for a Linear), so
    the same call gives the same weights. repo_id: the name the card's usage snippet loads (default: the output path).

    Returns (model, processor). Raises BaseModelError (a ValueError) naming the reason for a base it cannot use:
    another architecture, a checkpoint that already has the STAMP tokens, pickled-only weights without allow_pickle.
    """
    output = Path(output) if output is not None else None
    if output is not None and output.exists() and not force:
        raise BaseModelError(f"{output} exists; pass force=True (--force) to replace it")
    folder = checkpoints.resolve_checkpoint(base, allow_pickle, revision, token)
    config_dict = checkpoints.read_config(folder)
    _check_base_type(config_dict, base)
    shapes = checkpoints.weight_shapes(folder, allow_pickle)
    if shapes is not None and "classifier.weight" in shapes:
        raise BaseModelError(f"{base} already has a STAMP classifier: it is a STAMP checkpoint (use stamp-hf convert)")
    tokenizer = _base_tokenizer(folder, base)
    placeholders = {"min_placeholders": min_placeholders, "max_placeholders": max_placeholders}
    config = checkpoints.stamp_config(config_dict, folder, placeholders, accepted=BASE_TYPES, expected=EXPECTED_BASE)
    with _quiet_loading():  # its report lists the new classifier as missing; check_loading checks the rest
        model, info = STAMP_MODELS[config.model_type].from_pretrained(
            folder, config=config, dtype=dtype, use_safetensors=shapes is not None, allow_pickle=shapes is None,
            output_loading_info=True,
        )
    checkpoints.check_loading(info, folder, allowed_missing=("classifier.",))
    first_new_id = len(tokenizer)
    ids = add_stamp_tokens(tokenizer)
    if list(ids.values()) != list(range(first_new_id, first_new_id + len(STAMP_TOKENS))):
        raise BaseModelError(f"the tokenizer of {base} gave the STAMP tokens the ids {ids}, not the next ones after "
                             f"its {first_new_id} tokens: its vocabulary has gaps")
    resize_vocabulary(model, len(tokenizer))
    init_classifier(model.classifier, config.text_config.initializer_range, seed)
    model.config.set_stamp_token_ids(tokenizer)
    processor = STAMPProcessor(
        image_processor=checkpoints.load_image_processor([folder]),
        tokenizer=tokenizer,
        chat_template=_chat_template(folder, tokenizer),
        min_placeholders=min_placeholders,
        max_placeholders=max_placeholders,
    )
    model.eval()
    if output is not None:
        card = render_model_card(
            repo_id or str(output),
            base_model=str(base) if checkpoints.is_repo_id(base) else None,
            base_model_relation="finetune" if checkpoints.is_repo_id(base) else None,
            backbone=config_dict["model_type"],
            initialized_from=str(base),
        )
        checkpoints.write_folder(output, lambda staging: save_for_hub(model, processor, staging, card, max_shard_size))
    return model, processor


def base_model_type(name, revision: str | None = None, token: str | None = None) -> str | None:
    """The model_type in the config.json of `name` (a folder or a Hub id), or None if it has none to read."""
    from transformers.utils import cached_file

    try:
        path = cached_file(name, "config.json", revision=revision, token=token, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None


def resize_vocabulary(model, rows: int) -> None:
    """Embedding (and untied lm_head) resized to `rows`, as the official code does (`resize_token_embeddings(len(
    tokenizer))`): a base with more rows than tokens (Qwen2-VL: 151936 rows for 151657 + 4 tokens) is cut down, so
    the STAMP tokens take rows the base never used. A base with fewer rows grows; the new rows start at the mean of
    the existing ones (deterministic; the official code never meets this case)."""
    old_rows = model.get_input_embeddings().num_embeddings  # the weight's own shape is a shard's under ZeRO-3
    model.resize_token_embeddings(rows, mean_resizing=False)
    if rows > old_rows:
        layers = {model.get_input_embeddings(), model.get_output_embeddings()}
        with torch.no_grad(), whole_parameters([layer.weight for layer in layers]):
            for layer in layers:
                layer.weight[old_rows:] = layer.weight[:old_rows].mean(0)


def init_classifier(classifier: torch.nn.Linear, std: float, seed: int) -> None:
    """transformers' default initialisation of a Linear (weight N(0, std), bias 0), from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad(), whole_parameters([classifier.weight, classifier.bias]):
        weight = torch.randn(classifier.weight.shape, generator=generator) * std
        classifier.weight.copy_(weight.to(classifier.weight.dtype))
        classifier.bias.zero_()


def whole_parameters(parameters: list):
    """A block in which `parameters` are whole. Under DeepSpeed ZeRO-3 (a model loaded for training with it) each
    process holds a shard of them: they are gathered, and what the first process writes is scattered back."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=0)


@contextlib.contextmanager
def _quiet_loading():
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _check_base_type(config_dict: dict, base) -> None:
    model_type = config_dict.get("model_type")
    if model_type in STAMP_MODEL_TYPES:
        raise BaseModelError(f"{base} is already a STAMP model (model_type {model_type!r}); fine-tune it with stamp-hf train")
    if model_type not in BASE_TYPES:
        architectures = ", ".join(config_dict.get("architectures") or []) or "unknown architecture"
        raise BaseModelError(f"{base} is {model_type!r} ({architectures}): {EXPECTED_BASE}")


def _base_tokenizer(folder: Path, base):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:
        raise BaseModelError(f"cannot load the tokenizer of {base}: {error}".splitlines()[0]) from None
    present = [token for token in STAMP_TOKENS if token in tokenizer.get_vocab()]
    if present:
        raise BaseModelError(
            f"the tokenizer of {base} already has the STAMP token(s) {', '.join(present)}: it is a STAMP checkpoint, "
            "not a base (convert it with stamp-hf convert)"
        )
    return tokenizer


def _chat_template(folder: Path, tokenizer) -> str | None:
    """The base's chat template, wherever the Hub layout keeps it (chat_template.jinja, chat_template.json, or
    tokenizer_config.json); None leaves the processor's Qwen2-VL template."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        try:
            return json.loads((folder / "chat_template.json").read_text())["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BaseModelError(f"{folder}/chat_template.json has no 'chat_template' string") from None
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


__all__ = ["BASE_TYPES", "BaseModelError", "base_model_type", "init_from_base", "init_classifier", "resize_vocabulary"]
