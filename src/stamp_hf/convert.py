"""Convert released STAMP checkpoints (the official code's layout) into STAMP Hub folders.

Sources: a full fine-tune (config `model_type: qwen2_vl`, legacy or current Qwen2-VL keys, `classifier.*`, a tokenizer
with the four STAMP tokens) or a PEFT LoRA adapter on a Qwen2-VL base (merged into the base with peft). Everything is
checked before anything is written; the folder is built next to the destination and renamed into place at the end.
"""

from pathlib import Path

from transformers import AutoTokenizer
from .checkpoints import (
    CheckpointError,
    check_loading,
    current_weight_name,
    is_repo_id,
    load_image_processor,
    read_config,
    resolve_checkpoint,
    stamp_config,
    weight_shapes,
    with_lora,
    write_folder,
)
from .configuration_stamp import STAMP_TOKENS, STAMPConfig
from .hub import render_model_card, save_for_hub
from .modeling_stamp import STAMPModel
from .processing_stamp import STAMPProcessor

QWEN2_VL_TYPES = ("qwen2_vl", STAMPConfig.model_type)
EXPECTED_CHECKPOINT = "STAMP checkpoints are Qwen2-VL ('qwen2_vl')"
EMBED_KEYS = ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight")


def load_checkpoint(
    source,
    base=None,
    *,
    allow_pickle: bool = False,
    min_placeholders: int | None = None,
    max_placeholders: int | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> tuple[STAMPModel, STAMPProcessor]:
    """Load a released STAMP checkpoint (see `convert_checkpoint`) as a STAMPModel and STAMPProcessor, in memory."""
    model, processor, _ = _load(source, base, allow_pickle, min_placeholders, max_placeholders, revision, token)
    return model, processor


def convert_checkpoint(
    source,
    destination,
    base=None,
    *,
    allow_pickle: bool = False,
    min_placeholders: int | None = None,
    max_placeholders: int | None = None,
    max_shard_size="5GB",
    repo_id: str | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> Path:
    """Convert `source` (a local folder or a Hub repo id; a full STAMP checkpoint or a LoRA adapter) into a STAMP Hub
    folder at `destination` (new or empty): STAMPConfig with auto_map, sharded safetensors, the processor with the
    STAMP tokens, the remote code and a model card. `base` overrides the adapter's base model. `min_placeholders` /
    `max_placeholders` override the image-size bounds (default: the paper's 1024 / 1280). `repo_id` is the name the
    card's usage snippet loads (default: the destination path; `stamp-hf push` renders the card again for its repo).

    Pickled weights (.bin/.pt) are refused unless `allow_pickle=True`: loading them can run code.
    """
    destination = Path(destination)
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise CheckpointError(f"{destination} already exists and is not an empty folder; choose a new destination")
    model, processor, base_model = _load(
        source, base, allow_pickle, min_placeholders, max_placeholders, revision, token
    )
    card = render_model_card(
        repo_id or str(destination),
        base_model=base_model,
        base_model_relation="finetune" if base_model else None,
        converted_from=str(source) if is_repo_id(source) else None,
    )
    return write_folder(destination, lambda staging: save_for_hub(model, processor, staging, card, max_shard_size))


def _load(source, base, allow_pickle, min_placeholders, max_placeholders, revision, token):
    """(model, processor, base model for the card: a Hub repo id or None) from a full checkpoint or a LoRA adapter."""
    folder = resolve_checkpoint(source, allow_pickle, revision, token)
    placeholders = {"min_placeholders": min_placeholders, "max_placeholders": max_placeholders}
    placeholders = {k: v for k, v in placeholders.items() if v is not None}
    if (folder / "adapter_config.json").is_file():
        model, tokenizer, base_model, base_folder = _load_lora(folder, base, allow_pickle, revision, token, placeholders)
        image_processor = load_image_processor([folder, base_folder])
    else:
        if base is not None:
            raise CheckpointError(f"--base is for LoRA adapters, but {folder} has no adapter_config.json")
        model, tokenizer = _load_full(folder, allow_pickle, placeholders)
        image_processor = load_image_processor([folder])
        base_model = str(source) if is_repo_id(source) else None
    processor = STAMPProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        min_placeholders=model.config.min_placeholders,
        max_placeholders=model.config.max_placeholders,
        mask_resample="nearest",  # the released checkpoints' own post-processing, so `stamp-hf eval` is the official protocol
        sam_protocol="official",  # and their own SAM refinement (the official eval's points and mask prompt)
    )
    return model, processor, base_model


# ---------------------------------------------------------------------------------------------------- sources


def _tokenizer(folder: Path, rows: int):
    """The source tokenizer; it must carry the four STAMP tokens, each with an embedding row."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:
        raise CheckpointError(f"cannot load the tokenizer of {folder}: {error}".splitlines()[0]) from None
    vocab = tokenizer.get_vocab()
    missing = [token for token in STAMP_TOKENS if token not in vocab]
    if missing:
        raise CheckpointError(
            f"the tokenizer in {folder} lacks the STAMP token(s) {', '.join(missing)}; this is not a STAMP checkpoint"
        )
    if max(vocab.values()) >= rows:
        token, token_id = max(vocab.items(), key=lambda item: item[1])
        raise CheckpointError(
            f"token ids and embedding rows disagree in {folder}: the tokenizer's {token} has id {token_id} but the "
            f"embedding has only {rows} rows"
        )
    return tokenizer


# ---------------------------------------------------------------------------------------------------- full checkpoints


def _load_full(folder: Path, allow_pickle: bool, placeholders: dict):
    config = stamp_config(read_config(folder), folder, placeholders, QWEN2_VL_TYPES, EXPECTED_CHECKPOINT)
    shapes = weight_shapes(folder, allow_pickle)
    text = config.text_config
    if shapes is not None:
        if "classifier.weight" not in shapes or "classifier.bias" not in shapes:
            raise CheckpointError(
                f"no classifier.weight / classifier.bias in the weights of {folder}: a plain Qwen2-VL checkpoint, not STAMP"
            )
        if shapes["classifier.weight"] != (1, text.hidden_size) or shapes["classifier.bias"] != (1,):
            raise CheckpointError(
                f"classifier in {folder} has shape {shapes['classifier.weight']}, expected (1, {text.hidden_size})"
            )
        embed = next((shapes[k] for k in EMBED_KEYS if k in shapes), None)
        if embed is None:
            raise CheckpointError(f"no token embedding ({' or '.join(EMBED_KEYS)}) in the weights of {folder}")
        if embed[0] != text.vocab_size:
            raise CheckpointError(
                f"token ids and embedding rows disagree in {folder}: config vocab_size is {text.vocab_size} but the "
                f"embedding has {embed[0]} rows"
            )
        if not config.tie_word_embeddings and "lm_head.weight" not in shapes:
            raise CheckpointError(f"no lm_head.weight in {folder}, and config.json does not tie it to the embedding")
    tokenizer = _tokenizer(folder, text.vocab_size)
    config.set_stamp_token_ids(tokenizer)
    model, info = STAMPModel.from_pretrained(
        folder, config=config, dtype="auto", use_safetensors=shapes is not None, allow_pickle=shapes is None,
        output_loading_info=True,
    )
    check_loading(info, folder)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------------- LoRA adapters


def _load_lora(folder: Path, base, allow_pickle, revision, token, placeholders):
    try:
        from peft import LoraConfig, set_peft_model_state_dict
        from peft.utils import load_peft_weights
    except ImportError:
        raise CheckpointError(f"{folder} is a LoRA adapter; merging it needs peft (pip install 'stamp-hf[train]')") from None

    adapter_config = read_config(folder, "adapter_config.json")
    base = base or adapter_config.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{folder}/adapter_config.json names no base model; pass the base (--base)")
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{folder} is a {adapter_config['peft_type']} adapter; only LoRA adapters are supported")
    base_folder = resolve_checkpoint(base, allow_pickle, revision, token)
    config = stamp_config(read_config(base_folder), base_folder, placeholders, QWEN2_VL_TYPES, EXPECTED_CHECKPOINT)
    base_shapes = weight_shapes(base_folder, allow_pickle)

    if not (folder / "adapter_model.safetensors").is_file():
        weight_shapes(folder, allow_pickle, prefix="adapter_model")  # refuses: no weights, or pickled ones not allowed
    adapter = {_current_key(k): v for k, v in load_peft_weights(str(folder), device="cpu").items()}
    if "classifier.weight" not in adapter or "classifier.bias" not in adapter:
        raise CheckpointError(
            f"the adapter in {folder} has no classifier weights (classifier in modules_to_save): not a STAMP adapter"
        )
    embed = next((adapter[k].shape for k in EMBED_KEYS if k in adapter), None)
    rows = embed[0] if embed is not None else config.text_config.vocab_size
    tokenizer = _tokenizer(folder if (folder / "tokenizer_config.json").is_file() else base_folder, rows)

    model, info = STAMPModel.from_pretrained(
        base_folder, config=config, dtype="auto", use_safetensors=base_shapes is not None,
        allow_pickle=base_shapes is None, output_loading_info=True,
    )
    check_loading(info, base_folder, allowed_missing=("classifier.",))  # the base has no classifier: the adapter does
    if rows != config.text_config.vocab_size:
        model.resize_token_embeddings(rows)
    model.config.set_stamp_token_ids(tokenizer)

    lora_config = LoraConfig.from_pretrained(str(folder))
    lora_config.inference_mode = True
    peft_model = with_lora(model, lora_config)
    result = set_peft_model_state_dict(peft_model, {"base_model.model." + k: v for k, v in adapter.items()})
    if result.unexpected_keys:
        raise CheckpointError(
            f"the adapter in {folder} does not fit {base}: unexpected {', '.join(sorted(result.unexpected_keys)[:3])}"
        )
    return peft_model.merge_and_unload().eval(), tokenizer, str(base) if is_repo_id(base) else None, base_folder


def _current_key(key: str) -> str:
    """An adapter key without peft's `base_model.model.` prefix, legacy Qwen2-VL names renamed with the same
    transforms `STAMPModel.from_pretrained` applies to full checkpoints."""
    return current_weight_name(key.removeprefix("base_model.model."), STAMPConfig.model_type)
