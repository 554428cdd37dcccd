"""Tiny STAMP models, tokenizers and processors built entirely offline, for tests (ours and users').

Everything is real: transformers' Qwen2-VL / Qwen2.5-VL classes with a few small layers, a byte-level BPE tokenizer
with the Qwen2-VL special tokens and the STAMP tokens, the Qwen2-VL image processor and chat template (built by
stamp_hf.from_scratch at the toy size TINY). `tiny_base` writes a tiny Qwen-VL base checkpoint laid out as the Hub
repos are, for `init_from_base`. `stamp_hf.testing.official`: the official per-`<|seg|>` procedure and the other
references phase 2 is checked and timed against.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import GenerationConfig, LogitsProcessor
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.utils import is_torchvision_available

from ..configuration_stamp import STAMPConfig
from ..from_scratch import base_config, bpe_tokenizer, stamp_config
from ..modeling_stamp import STAMP_MODELS, STAMPModel
from ..processing_stamp import QWEN2_VL_CHAT_TEMPLATE, STAMPProcessor, default_mask_resample

_CORPUS = [
    "You are a helpful assistant.",
    "Please segment the cat in this image.",
    "Can you segment the red circle? Sure, it is here.",
    "Where is the small blue triangle in this image? It is at the top left.",
    "How many shapes are there? There are three shapes.",
    "the left right top bottom big small green yellow square star person dog car tree",
    "Yes, no. Sorry, there is no such object in the image.",
]
# the tests' toy size (stamp_hf.from_scratch.stamp_config's settings): 64-wide text, 32-wide ViT, 2 layers each,
# the backbone's own patches (14 px; Qwen3-VL 16 px) and 2 x 2 merge, 4 to 64 placeholders
TINY = dict(hidden_size=64, num_layers=2, vision_depth=2, vision_embed_dim=32, patch_size=None, merge_size=2,
            min_placeholders=4, max_placeholders=64)


class ForceTokens(LogitsProcessor):
    """Makes `generate` emit `token_ids` first, then decode freely: a known response (with known `<|seg|>`s) from a
    random model."""

    def __init__(self, token_ids, prompt_len: int):
        self.token_ids, self.prompt_len = list(token_ids), prompt_len

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        if step < len(self.token_ids):
            forced = torch.full_like(scores, -float("inf"))
            forced[:, self.token_ids[step]] = 0.0
            return forced
        return scores


def tiny_tokenizer(vocab_size: int = 512, corpus=None, stamp_tokens: bool = True) -> Qwen2Tokenizer:
    """`bpe_tokenizer` learned on `corpus` (texts; a few chat sentences by default): Qwen2-VL's special tokens, then
    the four STAMP tokens unless `stamp_tokens=False` (a base model's tokenizer)."""
    return bpe_tokenizer(_CORPUS * 4 if corpus is None else corpus, vocab_size, stamp_tokens)


def tiny_processor(
    tokenizer=None,
    min_placeholders: int = 4,
    max_placeholders: int = 64,
    backend=None,
    patch_size: int = 14,
    merge_size: int = 2,
    mask_resample: str = "nearest",
) -> STAMPProcessor:
    """A STAMPProcessor whose image backend ("torchvision" or "pil") is the one `AutoProcessor.from_pretrained` picks
    on this machine unless told otherwise, so a saved and reloaded processor gives the same pixels."""
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    if backend is None:
        backend = "torchvision" if is_torchvision_available() else "pil"
    if backend == "torchvision":
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as image_processor_class
    else:
        image_processor_class = Qwen2VLImageProcessorPil
    return STAMPProcessor(
        image_processor=image_processor_class(patch_size=patch_size, merge_size=merge_size),
        tokenizer=tokenizer,
        min_placeholders=min_placeholders,
        max_placeholders=max_placeholders,
        mask_resample=mask_resample,
    )


def tiny_config(tokenizer, **settings) -> STAMPConfig:
    """`stamp_config` at the toy size TINY (backbone="qwen2_5_vl" / "qwen3_vl" / "qwen3_vl_moe" for the other
    backbones; Qwen3-VL's 16 px patches unless patch_size is given); `settings` override sizes and any config setting.
    Token ids are read from `tokenizer`."""
    return stamp_config(tokenizer, **{**TINY, **settings})


def tiny_stamp(
    seed: int = 0, attn_implementation: str = "sdpa", tokenizer=None, **config_overrides
) -> tuple[STAMPModel, STAMPProcessor]:
    """A random tiny STAMP model (backbone="qwen2_5_vl" for Qwen2.5-VL) and its processor, ready for
    `generate_with_masks` and `save_pretrained`."""
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    config = tiny_config(tokenizer, **config_overrides)
    processor = tiny_processor(
        tokenizer,
        config.min_placeholders,
        config.max_placeholders,
        patch_size=config.vision_config.patch_size,
        merge_size=config.vision_config.spatial_merge_size,
        mask_resample=default_mask_resample(config.mask_loss_resolution),
    )
    torch.manual_seed(seed)
    config._attn_implementation = attn_implementation
    model = STAMP_MODELS[config.model_type](config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model, processor


def put_in_hub_cache(folder, repo_id: str, cache_dir, revision: str = "main") -> Path:
    """Lay `folder` out in a Hugging Face cache exactly as a Hub download leaves it (blobs, a snapshot of symlinks,
    refs/<revision>), so that `from_pretrained(repo_id)` resolves it offline. Returns the snapshot folder."""
    folder, cache_dir = Path(folder), Path(cache_dir)
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    commit = hashlib.sha1("".join(f"{p.relative_to(folder)}:{d}" for p, d in digests.items()).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for path, digest in digests.items():
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def tiny_sam(seed: int = 0):
    """A random tiny transformers `SamModel` (SAM's real 1024 px frame and 256 px mask prompt, toy widths) and its
    `SamProcessor`."""
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    config = SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, output_channels=32,
                           global_attn_indexes=[1], window_size=4, num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=32),
    )
    torch.manual_seed(seed)
    return SamModel(config).eval(), SamProcessor(SamImageProcessorPil())


def tiny_segment_anything(seed: int = 0):
    """A random tiny `segment_anything` Sam built from the package's own modules (vit_h's layout at toy widths)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    width = 32
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=width, img_size=1024, mlp_ratio=2, num_heads=2, patch_size=16, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=[1], window_size=4, out_chans=width,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=width, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=4
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=width, mlp_dim=64, num_heads=2),
            transformer_dim=width, iou_head_depth=3, iou_head_hidden_dim=32,
        ),
    ).eval()


def answer_with_masks(model, processor, answer: str = " it is", segs: int = 1) -> list[int]:
    """Make a random tiny model answer `answer` followed by `segs` `<|seg|>` and the end of turn, through its saved
    generation config (`sequence_bias`, a standard generate option), so it segments without a logits processor and
    keeps doing so after save / load. Returns the answer's token ids."""
    tokenizer = processor.tokenizer
    ids = tokenizer.encode(answer, add_special_tokens=False) + [model.config.seg_token_id] * segs
    ids.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    # each token gets a bias when the answer so far precedes it; later tokens of the answer get larger ones
    model.generation_config.sequence_bias = [[ids[: k + 1], 1000.0 * (k + 1)] for k in range(len(ids))]
    return ids


# Hub layout of the Qwen-VL base repos: processor class, architecture, and how their config.json differs from a save
# by transformers 5 (flat text settings with rope_scaling, legacy vision keys)
_BASE_LAYOUTS = {
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLForConditionalGeneration"),
    "qwen3_vl_moe": ("Qwen3VLProcessor", "Qwen3VLMoeForConditionalGeneration"),
}
# tokens the Qwen3 (and Qwen2.5) vocabularies add after Qwen2-VL's special tokens (151657-151668)
QWEN3_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                      "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>")


def tiny_base(
    folder, backbone: str = "qwen2_vl", tie: bool = True, layout: str = "hub", rows: int | None = None, seed: int = 0
) -> Path:
    """Write a random tiny Qwen-VL base checkpoint (no STAMP tokens, no classifier) to `folder`, as the Hub repos hold
    them, and return the folder. It is saved by transformers' own class; `layout="hub"` then rewrites it as the
    repos of Qwen/Qwen2-VL-2B-Instruct (tie=True), Qwen2-VL-7B-Instruct (tie=False) and Qwen2.5-VL-3B/7B-Instruct are:
    flat config.json (text settings at the top, `rope_scaling` of type mrope, legacy vision keys), bfloat16 weights
    under legacy names (`model.layers.*`, `visual.*`, no lm_head when tied). `layout="current"` keeps transformers 5's own save. Both
    come with the repos' chat_template.json, preprocessor_config.json (min/max_pixels), generation_config.json and
    tokenizer files. `rows`: embedding rows (default: 29 more than tokens, as the real ones have spare rows).

    backbone="qwen3_vl" / "qwen3_vl_moe": as the Qwen/Qwen3-VL-2B/4B-Instruct (tie=True), 8B (tie=False) and
    30B-A3B (MoE) repos are: nested config.json (text settings under text_config with `rope_scaling`), bfloat16
    weights under the current names (no lm_head when tied; MoE experts in the repos' transposed layout), the Qwen3
    tokens after Qwen2-VL's special ones, and preprocessor_config.json / video_preprocessor_config.json with 16 px
    patches. Both layouts apply as above."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    folder = Path(folder)
    qwen3 = backbone.startswith("qwen3")
    tokenizer = tiny_tokenizer(stamp_tokens=False)
    if qwen3:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED_TOKENS])
    rows = rows if rows is not None else len(tokenizer) + 29
    config = base_config(tokenizer, backbone, rows, **TINY, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True, top_k=1, top_p=0.001,
        temperature=0.01, repetition_penalty=1.0,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id],
    )  # the Instruct repos' generation_config.json
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor_class, _ = _BASE_LAYOUTS[backbone]
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, indent=2))
    if qwen3:
        _write_qwen3_preprocessors(folder)
    else:
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": processor_class,
        }, indent=2))  # fmt: skip
    if layout == "hub" and qwen3:
        _rewrite_as_qwen3_hub_repo(folder, backbone, tie, load_file, save_file)
    elif layout == "hub":
        _rewrite_as_hub_repo(folder, backbone, tie, load_file, save_file)
    elif layout != "current":
        raise ValueError(f"layout must be 'hub' or 'current', got {layout!r}")
    return folder


def _rewrite_as_hub_repo(folder: Path, backbone: str, tie: bool, load_file, save_file) -> None:
    config = json.loads((folder / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    for key in ("model_type", "dtype", "architectures"):
        text.pop(key, None)
    vision = config["vision_config"]
    vision.pop("dtype", None)
    vision.update(in_chans=vision.pop("in_channels", 3), spatial_patch_size=vision["patch_size"])
    if backbone == "qwen2_5_vl":
        vision["model_type"] = "qwen2_5_vl"  # as in the Qwen2.5-VL repos' config.json
    flat = {**text, **config, "torch_dtype": "bfloat16", "rope_theta": rope["rope_theta"], "tie_word_embeddings": tie}
    flat.pop("dtype", None)
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["architectures"] = [_BASE_LAYOUTS[backbone][1]]
    (folder / "config.json").write_text(json.dumps(flat, indent=2))
    for file in folder.glob("*.safetensors"):
        state = load_file(file)
        legacy = {}
        for key, value in state.items():
            if key.startswith("model.language_model."):
                key = "model." + key.removeprefix("model.language_model.")
            elif key.startswith("model.visual."):
                key = key.removeprefix("model.")
            if not (tie and key == "lm_head.weight"):
                legacy[key] = value.to(torch.bfloat16) if value.is_floating_point() else value  # as released
        save_file(legacy, file, metadata={"format": "pt"})


def _write_qwen3_preprocessors(folder: Path) -> None:
    """The Qwen3-VL repos' preprocessor_config.json and video_preprocessor_config.json (16 px patches, merge 2)."""
    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"longest_edge": 16777216, "shortest_edge": 65536}, **common,
        "image_processor_type": "Qwen2VLImageProcessorFast",
    }, indent=2))  # fmt: skip
    (folder / "video_preprocessor_config.json").write_text(json.dumps({
        "size": {"longest_edge": 25165824, "shortest_edge": 4096}, **common,
        "video_processor_type": "Qwen3VLVideoProcessor",
    }, indent=2))  # fmt: skip


def _rewrite_as_qwen3_hub_repo(folder: Path, backbone: str, tie: bool, load_file, save_file) -> None:
    config = json.loads((folder / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    rope = text.pop("rope_parameters")
    text.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, tie_word_embeddings=tie, dtype="bfloat16")
    vision.pop("rope_parameters", None)
    vision["model_type"] = backbone  # as in the repos' config.json
    config.pop("dtype", None)
    config.update(tie_word_embeddings=tie, architectures=[_BASE_LAYOUTS[backbone][1]])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for file in folder.glob("*.safetensors"):
        state = {}
        for key, value in load_file(file).items():
            if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                value = value.transpose(1, 2).contiguous()  # the MoE repos' (experts, in, out) layout
            if not (tie and key == "lm_head.weight"):
                state[key] = value.to(torch.bfloat16) if value.is_floating_point() else value
        save_file(state, file, metadata={"format": "pt"})
