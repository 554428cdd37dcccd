"""Publishing STAMP models: the model card (hub_cards/ template rendered with huggingface_hub) and the one-commit push.

A Hub repo folder is exactly what `model.save_pretrained` + `processor.save_pretrained` write (weights, config with
auto_map, remote code, processor, generation config) plus README.md, so whatever those write gets uploaded.
"""

import json
import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

CARD_TEMPLATE = Path(__file__).resolve().parent / "hub_cards" / "stamp_model_card.md"

DEFAULT_TRAINING_DATA = (
    "The released STAMP checkpoints were trained as in the paper: 3 epochs on 800k referring-segmentation samples "
    "(the training splits of RefCLEF, RefCOCO, RefCOCO+ and RefCOCOg), then 2 epochs on gRefCOCO (419k samples) for "
    "multi- and no-object expressions. A fine-tune should state its own data here."
)
DEFAULT_DATASETS = ["lichengunc/refcoco", "lichengunc/refcocog"]
UNTRAINED_DATA = "None yet: the STAMP head (classifier and STAMP token rows) is untrained. Fine-tune it with `stamp-hf train`."
BACKBONE_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL", "qwen3_vl_moe": "Qwen3-VL-MoE"}
# STAMP model type -> backbone model type (the tag and the name the card gives)
STAMP_BACKBONES = {"stamp": "qwen2_vl", "stamp_qwen2_5_vl": "qwen2_5_vl", "stamp_qwen3_vl": "qwen3_vl",
                   "stamp_qwen3_vl_moe": "qwen3_vl_moe"}


class PublishError(ValueError):
    """A folder, repo id or results file that cannot be published; the message names it."""


def read_eval_results(path) -> list[dict]:
    """Results file: a JSON list of {"dataset": name, "dataset_type": hub id, "split": ..., "cIoU": x, "gIoU": y}
    (cIoU / gIoU in percent; at least one of them per entry)."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PublishError(f"cannot read eval results {path}: {error}") from None
    rows = [rows] if isinstance(rows, dict) else rows
    if not isinstance(rows, list) or not rows:
        raise PublishError(f"{path}: expected a JSON list of results, one per dataset")
    results = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "dataset" not in row:
            raise PublishError(f"{path}: entry {i} has no 'dataset' name")
        metrics = {name: row.get(name) for name in ("cIoU", "gIoU")}
        if all(value is None for value in metrics.values()):
            raise PublishError(f"{path}: entry {i} ({row['dataset']}) has neither cIoU nor gIoU")
        for name, value in metrics.items():
            if value is not None and not isinstance(value, (int, float)):
                raise PublishError(f"{path}: entry {i} ({row['dataset']}): {name} must be a number, got {value!r}")
        results.append(
            {
                "dataset": str(row["dataset"]),
                "dataset_type": str(row.get("dataset_type", row["dataset"])),
                "split": row.get("split"),
                "ciou": metrics["cIoU"],
                "giou": metrics["gIoU"],
            }
        )
    return results


def render_model_card(
    repo_id: str,
    base_model: str | None = None,
    base_model_relation: str | None = None,
    converted_from: str | None = None,
    eval_results: list[dict] | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    training_data: str = DEFAULT_TRAINING_DATA,
    backbone: str = "qwen2_vl",
    initialized_from: str | None = None,
) -> ModelCard:
    """The STAMP model card for `repo_id`; `eval_results` as returned by `read_eval_results` (adds a model-index).
    `backbone`: "qwen2_vl", "qwen2_5_vl", "qwen3_vl" or "qwen3_vl_moe". `initialized_from`: the base of a fresh `init_from_base` folder (the card
    then says it is an untrained STAMP head on that base, and the card data keeps it for `push`)."""
    index = []
    for row in eval_results or []:
        for metric, value in (("cIoU", row["ciou"]), ("gIoU", row["giou"])):
            if value is not None:
                index.append(
                    EvalResult(
                        task_type="image-segmentation",
                        task_name="Referring expression segmentation",
                        dataset_type=row["dataset_type"],
                        dataset_name=row["dataset"],
                        dataset_split=row["split"],
                        metric_type=metric.lower(),
                        metric_name=metric,
                        metric_value=value,
                    )
                )
    model_name = Path(repo_id).name
    card_data = ModelCardData(
        model_name=model_name,
        license=license,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        base_model=base_model,
        base_model_relation=base_model_relation if base_model else None,
        tags=["stamp", backbone, "image-segmentation", "referring-segmentation", "custom_code"],
        datasets=DEFAULT_DATASETS if datasets is None else datasets,
        eval_results=index or None,
        **({"stamp_initialized_from": initialized_from} if initialized_from else {}),
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id,
        base_model=base_model,
        converted_from=converted_from,
        eval_results=eval_results,
        training_data=UNTRAINED_DATA if initialized_from else training_data,
        backbone_name=BACKBONE_NAMES[backbone],
        initialized_from=initialized_from,
    )


def save_for_hub(model, processor, folder, card: ModelCard, max_shard_size="5GB") -> Path:
    """Write a complete Hub repo folder: the model's and the processor's own save_pretrained, plus the card."""
    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    processor.save_pretrained(folder)
    card.save(folder / "README.md")
    return folder


def push_folder(
    folder,
    repo_id: str,
    private: bool = False,
    eval_results=None,
    token: str | None = None,
    commit_message: str = "Upload STAMP model",
    max_shard_size="5GB",
):
    """Publish a saved or converted STAMP folder to `repo_id` in one commit: the model and processor are loaded (so a
    folder that does not load is refused before anything is uploaded) and saved again with the current remote code,
    with a model card that keeps the folder card's base model and adds `eval_results` (a path, see
    `read_eval_results`). Returns the commit info."""
    from . import STAMP_MODELS, STAMPProcessor

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PublishError(f"{folder} is not a saved model folder (no config.json)")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type not in STAMP_BACKBONES:
        raise PublishError(
            f"{folder}/config.json has model_type {model_type!r}, not a STAMP one ({', '.join(STAMP_BACKBONES)}); "
            "convert it first (stamp-hf convert) or make one from a base (stamp-hf init)"
        )
    results = read_eval_results(eval_results) if eval_results is not None else None
    previous = ModelCard.load(folder / "README.md").data if (folder / "README.md").is_file() else ModelCardData()
    card = render_model_card(
        repo_id,
        base_model=previous.base_model,
        base_model_relation=getattr(previous, "base_model_relation", None),
        eval_results=results,
        license=previous.license or "apache-2.0",
        datasets=previous.datasets,
        backbone=STAMP_BACKBONES[model_type],
        initialized_from=getattr(previous, "stamp_initialized_from", None),
    )
    model = STAMP_MODELS[model_type].from_pretrained(folder, dtype="auto")
    processor = STAMPProcessor.from_pretrained(folder)
    for loading_flag in ("is_local", "local_files_only"):  # how we loaded it, not a setting to publish
        processor.tokenizer.init_kwargs.pop(loading_flag, None)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        save_for_hub(model, processor, staging, card, max_shard_size=max_shard_size)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(staging).as_posix(), path_or_fileobj=str(path))
            for path in sorted(Path(staging).rglob("*"))
            if path.is_file()
        ]
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return api.create_commit(repo_id, operations=operations, commit_message=commit_message)
