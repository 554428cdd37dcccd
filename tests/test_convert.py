"""Released STAMP checkpoints: tiny ones built here in the official layout (qwen2_vl config, legacy or current keys,
four added tokens, classifier; a PEFT LoRA adapter with modules_to_save) are converted, and the converted model is
checked against the same weights run through paths that do not share the converter."""

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor, Qwen2VLForConditionalGeneration

from conftest import chat, random_image, run_isolated
from stamp_hf import STAMP_TOKENS, STAMPModel, convert_checkpoint, load_checkpoint
from stamp_hf.testing import tiny_stamp
from test_phase2 import reference_mask_logits

STAMP_ONLY_SETTINGS = (
    "seg_token", "mask_token", "yes_token", "no_token", "seg_token_id", "mask_token_id", "yes_token_id",
    "no_token_id", "min_placeholders", "max_placeholders", "mask_threshold", "bce_loss_weight", "dice_loss_weight",
)  # fmt: skip
PLACEHOLDERS = {"min_placeholders": 4, "max_placeholders": 64}


def legacy_key(key: str) -> str:
    """The key names of checkpoints saved by transformers 4.x (written out here, not taken from the converter)."""
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    if key.startswith("model.visual."):
        return key.removeprefix("model.")
    return key


def qwen2_vl_config(model, flat: bool = False) -> dict:
    """config.json as the official code writes it: Qwen2-VL's, no STAMP settings. `flat`: the text settings at the
    top level with `rope_scaling`, as in Qwen2-VL-2B-Instruct's own config.json and older saves."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in STAMP_ONLY_SETTINGS}
    config.pop("auto_map", None)
    config.update(model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"])
    if flat:
        text = config.pop("text_config")
        rope = text.pop("rope_parameters")
        text.pop("model_type")
        config = {**text, **config, "rope_theta": rope["rope_theta"]}
        config["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    return config


def sharpen_classifier(classifier, seed):
    """Well-separated mask logits, so that thresholded masks are a meaningful comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=generator))
        classifier.bias.zero_()


def official_checkpoint(folder: Path, layout: str, seed: int = 0, tie: bool = False, shards: int = 1):
    """A tiny STAMP checkpoint as the released ones look: qwen2_vl config.json, safetensors in `layout` ("legacy":
    model.layers.* / visual.*, "current": model.language_model.* / model.visual.*), lm_head absent when tied,
    classifier.*, tokenizer with the four STAMP tokens after the Qwen2-VL ones, Qwen2-VL preprocessor config."""
    model, processor = tiny_stamp(seed=seed, tie_word_embeddings=tie)
    sharpen_classifier(model.classifier, seed)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if tie:
        del state["lm_head.weight"]
    if layout == "legacy":
        state = {legacy_key(k): v for k, v in state.items()}
    folder.mkdir(parents=True)
    keys = sorted(state)
    if shards == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i::shards]
            save_file({k: state[k] for k in part}, folder / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(qwen2_vl_config(model, flat=layout == "legacy"), indent=2))
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    return model, processor


def read_tensors(folder: Path, names) -> dict:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if k in names})
    return out


def segment_inputs(processor, image):
    """A prompt and the same prompt followed by an answer with two <|seg|> (trusted text: control tokens kept)."""
    question = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Segment the cat."}]}
    answer = {"role": "assistant", "content": "Sure, <|seg|> and here <|seg|>."}
    template = dict(tokenize=True, return_dict=True, return_tensors="pt")
    prompt = processor.apply_chat_template([question], add_generation_prompt=True, **template)
    forced = processor.apply_chat_template([question, answer], sanitize_control_tokens=False, **template)
    return prompt, forced


def reference_outputs(source: Path, processor, image):
    """Text and mask logits of the official folder through transformers' own Qwen2VLForConditionalGeneration (its
    built-in legacy-key conversion) and the classifier read straight from the safetensors files: no converter code."""
    qwen = Qwen2VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    classifier_weights = read_tensors(source, {"classifier.weight", "classifier.bias"})
    classifier = torch.nn.Linear(qwen.config.text_config.hidden_size, 1)
    classifier.load_state_dict({k.removeprefix("classifier."): v for k, v in classifier_weights.items()})
    ids = processor.tokenizer.convert_tokens_to_ids
    config = SimpleNamespace(
        image_token_id=qwen.config.image_token_id,
        seg_token_id=ids("<|seg|>"),
        mask_token_id=ids("<|mask|>"),
        text_config=qwen.config.text_config,
    )
    prompt, forced = segment_inputs(processor, image)
    with torch.no_grad():
        text_logits = qwen(**forced).logits
        stand_in = SimpleNamespace(config=config, model=qwen.model, classifier=classifier)
        mask_logits = reference_mask_logits(stand_in, {**forced, "input_ids": prompt["input_ids"]}, forced["input_ids"])
    return text_logits, mask_logits


def check_against_reference(converted, processor, source: Path, image):
    text_ref, masks_ref = reference_outputs(source, processor, image)
    _, forced = segment_inputs(processor, image)
    with torch.no_grad():
        text = converted(**forced).logits
        (masks,) = converted.predict_masks(**forced)
    assert (text - text_ref).abs().max().item() <= 1e-4
    assert len(masks) == len(masks_ref) == 2
    for got, want in zip(masks, masks_ref):
        assert (got.flatten() - want).abs().max().item() <= 1e-4
        assert torch.equal(got.flatten() > 0, want > 0)
        assert 0 < int((want > 0).sum()) < want.numel()  # both classes present: the threshold check means something


@pytest.mark.parametrize("layout, tie, shards", [("legacy", True, 2), ("current", False, 1)])
def test_official_checkpoint_converts_and_matches_reference(tmp_path, layout, tie, shards):
    source, destination = tmp_path / "official", tmp_path / "org" / "stamp-tiny"
    original, processor = official_checkpoint(source, layout, seed=1, tie=tie, shards=shards)
    assert any(k.startswith("visual.") for k in read_keys(source)) == (layout == "legacy")

    convert_checkpoint(source, destination, max_shard_size="200KB", **PLACEHOLDERS)

    files = {p.name for p in destination.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "configuration_stamp.py", "modeling_stamp.py",
            "processing_stamp.py", "processor_config.json", "tokenizer.json", "README.md"} <= files  # fmt: skip
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # sharded
    assert not [f for f in files if f.endswith((".bin", ".pt"))]
    keys = read_keys(destination)  # saved like transformers' own Qwen2-VL: in the key layout it was loaded from
    assert ("visual.patch_embed.proj.weight" in keys) == ("model.embed_tokens.weight" in keys) == (layout == "legacy")
    config = json.loads((destination / "config.json").read_text())
    assert config["model_type"] == "stamp" and config["auto_map"]["AutoModel"] == "modeling_stamp.STAMPModel"
    tokenizer = processor.tokenizer
    assert [config[f"{n}_token_id"] for n in ("seg", "mask", "yes", "no")] == tokenizer.convert_tokens_to_ids(
        list(STAMP_TOKENS)
    )
    card = ModelCard.load(destination / "README.md")
    assert card.data.library_name == "transformers" and "custom_code" in card.data.tags

    converted = AutoModel.from_pretrained(destination).eval()
    converted_processor = AutoProcessor.from_pretrained(destination)
    assert converted_processor.tokenizer.convert_tokens_to_ids(list(STAMP_TOKENS)) == tokenizer.convert_tokens_to_ids(
        list(STAMP_TOKENS)
    )
    image = random_image(90, 150, seed=3)
    check_against_reference(converted, converted_processor, source, image)
    # the converted processor gives the official processor's inputs
    assert torch.equal(chat(converted_processor, image)["input_ids"], chat(processor, image)["input_ids"])


def test_stamp_model_loads_official_layout_directly(tmp_path):
    """STAMPModel.from_pretrained on the released folders (both key layouts) via its registered key mapping: every
    weight found, none left over, equal to the original tensors."""
    for layout in ("legacy", "current"):
        source = tmp_path / layout
        original, processor = official_checkpoint(source, layout, seed=2)
        config = original.config
        model, info = STAMPModel.from_pretrained(source, config=config, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        for key, tensor in original.state_dict().items():
            assert torch.equal(model.state_dict()[key], tensor), key
        in_memory, _ = load_checkpoint(source, **PLACEHOLDERS)
        assert torch.equal(in_memory.classifier.weight, original.classifier.weight)


def test_converted_folder_and_official_keys_load_as_remote_code(tmp_path):
    """Fresh process, offline, stamp_hf unimportable: the converted folder loads through AutoModel / AutoProcessor, and
    the remote-code STAMPModel class itself reads the legacy-key official folder."""
    source, destination = tmp_path / "official", tmp_path / "converted"
    original, processor = official_checkpoint(source, "legacy", seed=4)
    convert_checkpoint(source, destination, **PLACEHOLDERS)
    image = random_image(84, 112, seed=6)
    image.save(tmp_path / "image.png")
    _, forced = segment_inputs(processor, image)
    (expected,) = original.predict_masks(**forced)
    torch.save(expected, tmp_path / "expected.pt")
    out = run_isolated(
        f"""
        import torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(destination)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(destination)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        question = {{"role": "user", "content": [{{"type": "image", "image": Image.open({str(tmp_path / 'image.png')!r})}},
                                                {{"type": "text", "text": "Segment the cat."}}]}}
        answer = {{"role": "assistant", "content": "Sure, <|seg|> and here <|seg|>."}}
        forced = processor.apply_chat_template([question, answer], sanitize_control_tokens=False, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        (masks,) = model.predict_masks(**forced)
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        for got, want in zip(masks, expected, strict=True):
            assert (got - want).abs().max() <= 1e-5, (got - want).abs().max()
        official, info = type(model).from_pretrained({str(source)!r}, config=model.config, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        for key, tensor in model.state_dict().items():
            assert torch.equal(official.state_dict()[key], tensor), key
        print("remote ok", len(masks))
        """,
        tmp_path,
    )
    assert "remote ok 2" in out


def lora_release(tmp_path, layout):
    """A tiny Qwen2-VL base (plain: no STAMP tokens, no classifier, legacy keys) and a LoRA adapter on it as the
    official code leaves it: LoRA on the attention projections, embed_tokens / lm_head / classifier in
    modules_to_save, the STAMP tokenizer, base_model_name_or_path naming the base. Returns the base folder, the
    adapter folder in `layout`, the same adapter with current key names (for the reference) and the processor."""
    from peft import LoraConfig, get_peft_model

    stamp, processor = tiny_stamp(seed=5)
    vocab = stamp.config.text_config.vocab_size
    base_vocab = vocab - len(STAMP_TOKENS)
    base_dir, adapter_dir = tmp_path / "qwen2-vl-base", tmp_path / f"stamp-lora-{layout}"
    base_dir.mkdir()
    base_config = qwen2_vl_config(stamp, flat=True)  # as Qwen2-VL-7B-Instruct's config.json
    base_config["vocab_size"] = base_vocab
    state = {legacy_key(k): v.clone().contiguous() for k, v in stamp.state_dict().items() if not k.startswith("classifier.")}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][:base_vocab].clone()
    save_file(state, base_dir / "model.safetensors", metadata={"format": "pt"})
    (base_dir / "config.json").write_text(json.dumps(base_config))
    processor.image_processor.save_pretrained(base_dir)

    # the fine-tune: the base plus the STAMP tokens and a classifier, LoRA-trained (random non-zero deltas here)
    model = reference_base(base_dir, stamp.config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      modules_to_save=["embed_tokens", "lm_head", "classifier"])  # fmt: skip
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * (0.2 if "lora_" in name else 0.02))
    classifier = peft_model.base_model.model.classifier.modules_to_save["default"]
    sharpen_classifier(classifier, 7)
    with torch.no_grad():  # centre the logits: both classes present in the masks the test compares
        (logits,) = peft_model.predict_masks(**segment_inputs(processor, random_image(90, 150, seed=8))[1])
        classifier.bias -= torch.cat([g.flatten() for g in logits]).median()
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    current_dir = tmp_path / "stamp-lora-reference"
    peft_model.save_pretrained(current_dir)
    processor.tokenizer.save_pretrained(current_dir)
    if layout == "current":
        return base_dir, current_dir, current_dir, processor
    # the same adapter as saved from a model with the legacy module names (model.layers.*, not model.language_model.*)
    shutil.copytree(current_dir, adapter_dir)
    weights = load_file(current_dir / "adapter_model.safetensors")
    renamed = {"base_model.model." + legacy_key(k.removeprefix("base_model.model.")): v for k, v in weights.items()}
    assert any(k.startswith("base_model.model.model.layers.") for k in renamed)
    save_file(renamed, adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    return base_dir, adapter_dir, current_dir, processor


def reference_base(base_dir: Path, stamp_config):
    """The base as transformers' own Qwen2VLForConditionalGeneration loads it, copied into a STAMPModel (random
    classifier: the adapter brings it) with the embeddings resized for the STAMP tokens."""
    qwen = Qwen2VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    config = copy.deepcopy(stamp_config)
    config.text_config.vocab_size = qwen.config.text_config.vocab_size
    model = STAMPModel(config)
    result = model.load_state_dict(qwen.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["classifier.bias", "classifier.weight"] and not result.unexpected_keys
    model.resize_token_embeddings(stamp_config.text_config.vocab_size)
    return model.eval()


@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_lora_adapter_is_merged_and_equals_peft(tmp_path, layout):
    from peft import PeftModel

    base_dir, adapter_dir, reference_adapter, processor = lora_release(tmp_path, layout)
    destination = tmp_path / "merged"
    convert_checkpoint(adapter_dir, destination, **PLACEHOLDERS)
    config = json.loads((destination / "config.json").read_text())
    assert config["model_type"] == "stamp" and config["text_config"]["vocab_size"] == len(processor.tokenizer)
    keys = read_keys(destination)
    assert "classifier.weight" in keys and not any("lora" in k or "modules_to_save" in k for k in keys)
    assert ModelCard.load(destination / "README.md").data.base_model is None  # a local base is no Hub base_model

    # reference: the base through transformers' own loading, the adapter applied (unmerged) by peft itself
    stamp_config = AutoModel.from_pretrained(destination).config
    reference = PeftModel.from_pretrained(reference_base(base_dir, stamp_config), reference_adapter).eval()
    converted = AutoModel.from_pretrained(destination).eval()
    image = random_image(90, 150, seed=8)
    _, forced = segment_inputs(processor, image)
    with torch.no_grad():
        want_text, got_text = reference(**forced).logits, converted(**forced).logits
        (want_masks,), (got_masks,) = reference.predict_masks(**forced), converted.predict_masks(**forced)
        with reference.disable_adapter():  # the adapter matters: without it the outputs differ
            assert (reference(**forced).logits - want_text).abs().max() > 1e-2
    assert (got_text - want_text).abs().max().item() <= 1e-4
    for got, want in zip(got_masks, want_masks, strict=True):
        assert (got - want).abs().max().item() <= 1e-4
        # merged against unmerged weights: a logit within that tolerance of 0 may fall on either side of the threshold
        # (peft 0.21.2: one of 15 at 1e-6), every other patch must be decided alike
        decided = want.abs() > 1e-4
        assert torch.equal((got > 0)[decided], (want > 0)[decided]) and decided.sum() >= want.numel() - 1
        assert 0 < int((want > 0).sum()) < want.numel(), want


def read_keys(folder: Path) -> list[str]:
    keys = []
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys += list(f.keys())
    return keys


def text_only_qwen2(folder: Path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(folder)


def pickle_only(folder: Path):
    official_checkpoint(folder, "legacy")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def no_classifier(folder: Path):
    official_checkpoint(folder, "legacy")
    weights = {k: v for k, v in load_file(folder / "model.safetensors").items() if not k.startswith("classifier.")}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def tokenizer_beyond_embedding(folder: Path):
    _, processor = official_checkpoint(folder, "legacy")
    processor.tokenizer.add_tokens(["<|extra_a|>", "<|extra_b|>"], special_tokens=True)
    processor.tokenizer.save_pretrained(folder)


def config_vocab_mismatch(folder: Path):
    official_checkpoint(folder, "current")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["vocab_size"] += 8
    (folder / "config.json").write_text(json.dumps(config))


BAD_SOURCES = {
    "empty folder": (lambda folder: folder.mkdir(), "no config.json or adapter_config.json"),
    "text-only Qwen2": (text_only_qwen2, "model_type 'qwen2'"),
    "pickle-only .bin": (pickle_only, "only pickled weights (pytorch_model.bin)"),
    "no classifier": (no_classifier, "no classifier.weight / classifier.bias"),
    "tokenizer beyond embedding": (tokenizer_beyond_embedding, "token ids and embedding rows disagree"),
    "config vocab mismatch": (config_vocab_mismatch, "token ids and embedding rows disagree"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_sources_give_one_line_and_write_nothing(tmp_path, capsys, case):
    from stamp_hf.cli import main

    make, message = BAD_SOURCES[case]
    source, out_dir = tmp_path / "source", tmp_path / "out"
    make(source)
    out_dir.mkdir()
    capsys.readouterr()
    assert main(["convert", str(source), str(out_dir / "stamp")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stamp-hf convert: error: ") and message in err, err
    assert list(out_dir.iterdir()) == []  # no destination, no partial folder


def test_pickle_needs_opt_in_and_destination_is_never_overwritten(tmp_path, capsys):
    from stamp_hf.cli import main

    pickle_only(tmp_path / "source")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["convert", str(tmp_path / "source"), str(taken), "--allow-pickle"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "mine"

    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "converted"), "--allow-pickle"]) == 0
    assert "wrote" in capsys.readouterr().out
    keys = read_keys(tmp_path / "converted")
    assert "classifier.weight" in keys and not list((tmp_path / "converted").glob("*.bin"))


def test_convert_from_a_repo_id_in_the_hub_cache(tmp_path, monkeypatch):
    """A repo id resolves through huggingface_hub (here: offline, from a cache laid out as a download leaves it)."""
    from huggingface_hub import constants

    from stamp_hf.testing import put_in_hub_cache

    official_checkpoint(tmp_path / "official", "legacy", seed=3)
    put_in_hub_cache(tmp_path / "official", "JiaZL/STAMP-tiny-uni", tmp_path / "cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    destination = tmp_path / "converted"
    convert_checkpoint("JiaZL/STAMP-tiny-uni", destination, repo_id="stamp-org/stamp-tiny", **PLACEHOLDERS)
    card = ModelCard.load(destination / "README.md")
    assert card.data.base_model == "JiaZL/STAMP-tiny-uni" and "stamp-org/stamp-tiny" in card.text
    assert read_keys(destination) and (destination / "modeling_stamp.py").is_file()


def test_bad_lora_adapters_are_refused_before_writing(tmp_path, capsys):
    from stamp_hf.cli import main

    base_dir, adapter_dir, _, _ = lora_release(tmp_path, "current")
    no_base = tmp_path / "no-base"
    shutil.copytree(adapter_dir, no_base)
    config = json.loads((no_base / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (no_base / "adapter_config.json").write_text(json.dumps(config))
    no_classifier = tmp_path / "no-classifier"
    shutil.copytree(adapter_dir, no_classifier)
    weights = load_file(no_classifier / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if ".classifier." not in k}, no_classifier / "adapter_model.safetensors")
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter_dir, pickled)
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for source, extra, message in [
        (no_base, [], "names no base model; pass the base (--base)"),
        (no_classifier, [], "has no classifier weights"),
        (pickled, [], "only pickled weights (adapter_model.bin)"),
        (base_dir, ["--base", str(base_dir)], "--base is for LoRA adapters"),
    ]:
        capsys.readouterr()
        assert main(["convert", str(source), str(out_dir / "stamp"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert list(out_dir.iterdir()) == []
    # the base given explicitly replaces the missing one
    assert main(["convert", str(no_base), str(out_dir / "stamp"), "--base", str(base_dir)]) == 0
    assert "classifier.weight" in read_keys(out_dir / "stamp")
