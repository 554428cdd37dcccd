"""Publishing: the model card (metadata round-trip, usage snippet that runs as written) and the uploads of
model.push_to_hub / processor.push_to_hub / `stamp-hf push`, loaded back by repo id in a fresh process.

There is no network here. The mock sits at the network boundary only: HfApi.create_repo and HfApi.create_commit,
the two HTTP calls that write to the Hub, are replaced by recorders that keep each operation's path and bytes.
Everything before them (save_pretrained, card rendering, commit operations) is the real code.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from safetensors.torch import load as load_safetensors

from conftest import chat, random_image, run_isolated
from stamp_hf import render_model_card
from stamp_hf.cli import main
from stamp_hf.testing import put_in_hub_cache

REPO_ROOT = Path(__file__).resolve().parents[1]
REMOTE_CODE = sorted(p.name for p in REPO_ROOT.glob("*_stamp.py"))
RESULTS = [
    {"dataset": "RefCOCO", "dataset_type": "lichengunc/refcoco", "split": "val", "cIoU": 79.4, "gIoU": 80.2},
    {"dataset": "gRefCOCO", "dataset_type": "grefcoco", "split": "val", "gIoU": 74.8},
]


class HubRecorder:
    """Stands in for the Hub's HTTP write endpoints; keeps what would have been sent."""

    def __init__(self):
        self.repos, self.commits = [], []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append({"repo_id": repo_id, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, api, repo_id, operations, commit_message=None, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
        self.commits.append({"repo_id": repo_id, "message": commit_message, "files": files})
        return CommitInfo(f"https://huggingface.co/{repo_id}/commit/{'0' * 40}", commit_message, "", "0" * 40)


@pytest.fixture
def hub(monkeypatch):
    """The Hub, mocked at the network boundary: repos and commits are recorded; `stamp-hf push`'s reachability probe
    answers as a reachable Hub would (the tests run with HF_HUB_OFFLINE=1, which the recorder stands in for)."""
    from huggingface_hub import constants

    from stamp_hf.commands import _checks

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_checks, "hub_unreachable", lambda: None)
    recorder = HubRecorder()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: recorder.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "create_commit", lambda api, repo_id, **kw: recorder.create_commit(api, repo_id, **kw))
    return recorder


def saved_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def expected_upload(model, processor, folder: Path) -> dict[str, bytes]:
    """What model.save_pretrained + processor.save_pretrained write: whatever they write must be uploaded."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return saved_files(folder)


def check_hub_repo_files(files: dict[str, bytes], model, model_class: str = "STAMPModel"):
    """A fresh user needs: weights, config with auto_map and custom_pipelines, every remote-code file byte-identical
    to the single source, processor, generation config, nothing pickled."""
    config = json.loads(files["config.json"])
    assert config["auto_map"]["AutoModel"] == f"modeling_stamp.{model_class}"
    assert config["custom_pipelines"]["stamp-segmentation"]["impl"] == "pipeline_stamp.STAMPSegmentationPipeline"
    assert REMOTE_CODE == ["configuration_stamp.py", "modeling_stamp.py", "pipeline_stamp.py", "processing_stamp.py",
                           "sam_stamp.py"]
    for name in REMOTE_CODE:
        assert files[name] == (REPO_ROOT / name).read_bytes(), name
    assert json.loads(files["processor_config.json"])["auto_map"]["AutoProcessor"] == "processing_stamp.STAMPProcessor"
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= files.keys()
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    weights = {}
    for name in files:
        if name.endswith(".safetensors"):
            weights.update(load_safetensors(files[name]))
    state = model.state_dict()
    assert len(weights) >= len(state) - 1  # lm_head may be tied
    assert torch.equal(weights["classifier.weight"], state["classifier.weight"])


def without_dtype(config: dict) -> dict:
    return {k: without_dtype(v) if isinstance(v, dict) else v for k, v in config.items() if k != "dtype"}


def test_card_metadata_round_trips(tmp_path):
    card = render_model_card(
        "stamp-org/stamp-2b-ft", base_model="JiaZL/STAMP-2B-uni", base_model_relation="finetune",
        eval_results=_results(tmp_path),
    )  # fmt: skip
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data
    assert data.license == "apache-2.0"
    assert data.library_name == "transformers" and data.pipeline_tag == "image-segmentation"
    assert data.base_model == "JiaZL/STAMP-2B-uni" and data.base_model_relation == "finetune"
    assert {"custom_code", "stamp"} <= set(data.tags) and data.datasets
    metrics = {(r.dataset_name, r.metric_name): r.metric_value for r in data.eval_results}
    assert metrics == {("RefCOCO", "cIoU"): 79.4, ("RefCOCO", "gIoU"): 80.2, ("gRefCOCO", "gIoU"): 74.8}
    assert data.to_dict()["model-index"][0]["name"] == "stamp-2b-ft"
    assert "# stamp-2b-ft\n" in loaded.text and "| RefCOCO | val | 79.4 | 80.2 |" in loaded.text and "@article{" in loaded.text


def _results(tmp_path):
    from stamp_hf.hub import read_eval_results

    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    return read_eval_results(path)


def test_card_usage_snippet_runs_as_written(tiny, tmp_path):
    model, processor = tiny
    repo_id = "stamp-org/stamp-tiny-card"
    card = render_model_card(repo_id, base_model="Qwen/Qwen2-VL-2B-Instruct", base_model_relation="finetune")
    (snippet,) = re.findall(r"```python\n(.*?)```", str(card), flags=re.S)
    assert f'"{repo_id}"' in snippet
    folder = tmp_path / "repo"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    # a random tiny model rarely says <|seg|>: its generation config makes it likely, so the masks part runs too
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["sequence_bias"] = [[[model.config.seg_token_id], 8.0]]
    (folder / "generation_config.json").write_text(json.dumps(generation))
    put_in_hub_cache(folder, repo_id, tmp_path / "hf_home" / "hub")
    random_image(100, 140, seed=2).save(tmp_path / "example.jpg")  # the file the snippet opens, in its working dir
    out = run_isolated(snippet, tmp_path)
    masks_line = out.strip().splitlines()[-1]  # one (height, width) per <|seg|>
    shapes = re.findall(r"\((\d+), (\d+)\)", masks_line)
    assert shapes and all(shape == ("100", "140") for shape in shapes), out


def test_model_and_processor_push_to_hub_upload_what_a_user_needs(tiny, tmp_path, hub):
    model, processor = tiny
    model.push_to_hub("stamp-org/stamp-tiny")
    processor.push_to_hub("stamp-org/stamp-tiny")
    assert [c["repo_id"] for c in hub.commits] == ["stamp-org/stamp-tiny"] * 2
    uploaded = {**hub.commits[0]["files"], **hub.commits[1]["files"]}
    expected = expected_upload(model, processor, tmp_path / "local")
    assert set(uploaded) == set(expected) | {"README.md"}
    for name, content in expected.items():
        assert uploaded[name] == content, name
    check_hub_repo_files(uploaded, model)


@pytest.mark.parametrize("fixture, model_class", [("tiny", "STAMPModel"), ("tiny_qwen3_vl", "STAMPQwen3VLModel")])
def test_stamp_hf_push_uploads_one_commit_that_loads_by_repo_id(fixture, model_class, tmp_path, hub, capsys, request):
    model, processor = request.getfixturevalue(fixture)
    folder = tmp_path / "finetuned"
    expected = expected_upload(model, processor, folder)
    render_model_card(str(folder), base_model="JiaZL/STAMP-2B-uni", base_model_relation="finetune").save(
        folder / "README.md"
    )  # a card from convert: the push keeps its base model
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))

    assert main(["push", str(folder), "stamp-org/stamp-tiny-ft", "--private", "--eval-results", str(results)]) == 0
    assert "pushed" in capsys.readouterr().out
    assert hub.repos == [{"repo_id": "stamp-org/stamp-tiny-ft", "private": True, "exist_ok": True}]
    (commit,) = hub.commits
    files = commit["files"]
    assert set(files) == set(expected) | {"README.md"}
    for name, content in expected.items():
        if name == "config.json":  # reloading records the sub-configs' dtype; every other setting is unchanged
            assert without_dtype(json.loads(files[name])) == without_dtype(json.loads(content))
        elif not name.endswith(".safetensors"):
            assert files[name] == content, name
    check_hub_repo_files(files, model, model_class)
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "JiaZL/STAMP-2B-uni" and card.data.base_model_relation == "finetune"
    assert {(r.dataset_name, r.metric_name) for r in card.data.eval_results} >= {("RefCOCO", "cIoU"), ("gRefCOCO", "gIoU")}
    assert '"stamp-org/stamp-tiny-ft"' in card.text

    # exactly those bytes, as a Hub download leaves them, loaded by repo id in a fresh process with transformers only
    uploaded = tmp_path / "uploaded"
    for name, content in files.items():
        (uploaded / name).parent.mkdir(parents=True, exist_ok=True)
        (uploaded / name).write_bytes(content)
    put_in_hub_cache(uploaded, "stamp-org/stamp-tiny-ft", tmp_path / "hf_home" / "hub")
    image = random_image(90, 150, seed=9)
    image.save(tmp_path / "image.png")
    with torch.no_grad():
        expected_logits = model(**chat(processor, image)).logits
    torch.save(expected_logits, tmp_path / "expected.pt")
    out = run_isolated(
        f"""
        import torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained("stamp-org/stamp-tiny-ft", trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained("stamp-org/stamp-tiny-ft", trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        messages = [{{"role": "user", "content": [{{"type": "image", "image": Image.open({str(tmp_path / 'image.png')!r})}},
                     {{"type": "text", "text": "Please segment the cat."}}]}}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        assert (logits - torch.load({str(tmp_path / 'expected.pt')!r})).abs().max() <= 1e-5
        print("loaded by repo id", type(model).__name__, type(processor).__name__)
        from transformers import pipeline
        segmenter = pipeline("stamp-segmentation", model="stamp-org/stamp-tiny-ft", trust_remote_code=True)
        result = segmenter(Image.open({str(tmp_path / 'image.png')!r}), "Please segment the cat.", max_new_tokens=4)
        assert set(result) == {{"text", "masks"}}, result
        print("pipeline", type(segmenter).__name__)
        """,
        tmp_path,
    )
    assert f"loaded by repo id {model_class} STAMPProcessor" in out
    assert "pipeline STAMPSegmentationPipeline" in out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing", "missing: no such folder"),
        (lambda tmp: _write(tmp / "results-bad", "results.json", '[{"dataset": "RefCOCO"}]'), "neither cIoU nor gIoU"),
    ],
)
def test_push_refuses_bad_input_before_uploading(tiny, tmp_path, hub, capsys, make, message):
    model, processor = tiny
    folder = tmp_path / "finetuned"
    expected_upload(model, processor, folder)
    bad = make(tmp_path)
    args = ["push", str(bad), "org/x"] if bad.name == "missing" else ["push", str(folder), "org/x", "--eval-results", str(bad)]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert hub.repos == [] and hub.commits == []


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir()
    (folder / name).write_text(text)
    return folder / name
