"""Save / load as Hub remote code: a fresh process with only transformers (stamp_hf unimportable), offline, loads a
saved folder and the same files as a repo id in a Hugging Face cache, and gets the same mask logits (to 1e-6, float noise) and the same masks."""

import json
from pathlib import Path

import torch

import stamp_hf
from conftest import ForceTokens, chat, forced_response, random_image, run_isolated
from stamp_hf.testing import put_in_hub_cache

REPO_ROOT = Path(__file__).resolve().parents[1]
REMOTE_FILES = ("configuration_stamp.py", "modeling_stamp.py", "pipeline_stamp.py", "processing_stamp.py", "sam_stamp.py")


def test_package_modules_are_the_top_level_files():
    for name in REMOTE_FILES:
        module = getattr(stamp_hf, name.removesuffix(".py"))
        assert Path(module.__file__).resolve() == (REPO_ROOT / name).resolve()


def test_saved_folder_and_hub_cache_load_in_a_fresh_process(tiny, tmp_path):
    model, processor = tiny
    folder = tmp_path / "stamp-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    # what a Hub repo needs, and nothing pickled
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_stamp.STAMPConfig", "AutoModel": "modeling_stamp.STAMPModel"}
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"]["AutoProcessor"] == (
        "processing_stamp.STAMPProcessor"
    )
    assert (folder / "model.safetensors").exists()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    for name in REMOTE_FILES:  # byte-identical to the single source
        assert (folder / name).read_bytes() == (REPO_ROOT / name).read_bytes()

    image = random_image(90, 150, seed=5)
    image.save(tmp_path / "image.png")
    inputs = chat(processor, image)
    response = forced_response(model, processor, segs=2)
    expected = model.generate_with_masks(
        **inputs, max_new_tokens=len(response), logits_processor=[ForceTokens(response, inputs["input_ids"].shape[1])]
    )
    torch.save({"response": response, "mask_logits": expected.mask_logits[0], "sequences": expected.sequences},
               tmp_path / "expected.pt")

    cache_dir = tmp_path / "hf_home" / "hub"
    put_in_hub_cache(folder, "stamp-org/stamp-tiny", cache_dir)

    out = run_isolated(
        f"""
        import sys, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor, LogitsProcessor

        class ForceTokens(LogitsProcessor):
            def __init__(self, ids, start): self.ids, self.start = ids, start
            def __call__(self, input_ids, scores):
                step = input_ids.shape[1] - self.start
                if step < len(self.ids):
                    forced = torch.full_like(scores, -float("inf")); forced[:, self.ids[step]] = 0.0; return forced
                return scores

        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        for source in ({str(folder)!r}, "stamp-org/stamp-tiny"):
            model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            messages = [{{"role": "user", "content": [{{"type": "image", "image": Image.open({str(tmp_path / 'image.png')!r})}},
                         {{"type": "text", "text": "Please segment the cat."}}]}}]
            inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")
            out = model.generate_with_masks(**inputs, max_new_tokens=len(expected["response"]),
                                            logits_processor=[ForceTokens(expected["response"], inputs["input_ids"].shape[1])])
            assert torch.equal(out.sequences, expected["sequences"])
            assert len(out.mask_logits[0]) == 2
            for got, want in zip(out.mask_logits[0], expected["mask_logits"]):
                assert (got - want).abs().max() <= 1e-6, (got - want).abs().max()  # float noise only
                assert torch.equal(got > 0, want > 0)
            print("loaded", source, type(model).__name__)
        print("stamp_hf importable:", sys.modules.get("stamp_hf", "absent"))
        """,
        tmp_path,
    )
    assert f"loaded {folder} STAMPModel" in out
    assert "loaded stamp-org/stamp-tiny STAMPModel" in out
    assert "stamp_hf importable: None" in out
