"""Argument mistakes, as a new user makes them, reported by the real console script in one line (exit 2) before torch
is imported; an unreachable Hub named within a stated time; the transformers range the remote code supports; chat's
--json / --out-dir; the same empty-prompt message everywhere; saved weights readable like the user's own files."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import transformers
from conftest import random_image
from stamp_hf.cli import main
from stamp_hf.testing import answer_with_masks, tiny_stamp

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "stamp-hf"
# the console script's main(), then whether torch was imported (printed on stdout)
PROBE = ("import sys\nfrom stamp_hf.cli import main\ntry:\n    status = main(sys.argv[1:])\nexcept SystemExit as e:\n"
         "    status = e.code\nprint('torch' in sys.modules)\nsys.exit(status)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_checks")
    model, processor = tiny_stamp(seed=1)
    answer_with_masks(model, processor, segs=1)  # " it is<|seg|>": one mask per answer
    model.save_pretrained(folder / "tiny")
    processor.save_pretrained(folder / "tiny")
    random_image(50, 150, seed=11).save(folder / "image.png")
    (folder / "notes.txt").write_text("not a model")
    (folder / "empty_folder").mkdir()
    return folder


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def probe(workdir, *args, offline=True, timeout=60):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=workdir, capture_output=True, text=True,
                            env=env, timeout=timeout)
    return result, time.perf_counter() - start


def assert_one_line(result, command, *fragments):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"stamp-hf {command}: error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


PRE_TORCH = [
    (["segment", "--device", "banana", "x.png", "Segment it."], "--device banana", "not a torch device"),
    (["segment", "image.png", "Segment it.", "--model", "./no_such_model"], "--model ./no_such_model", "no such folder"),
    (["segment", "image.png", "Segment it.", "--model", "/abs/missing"], "--model /abs/missing", "no such folder"),
    (["segment", "image.png", "Segment it.", "--model", "notes.txt"], "--model notes.txt", "is a file"),
    (["segment", "image.png", "Segment it.", "--model", "empty_folder"], "--model empty_folder", "no config.json"),
    (["segment", "image.png", "Segment it.", "--model", "someone/not-cached"], "--model someone/not-cached",
     "not in the Hugging Face cache"),
    (["segment", "missing.png", "Segment it.", "--model", "tiny"], "missing.png", "no such image file"),
    (["segment", "empty_folder", "Segment it.", "--model", "tiny"], "empty_folder", "is a folder, not an image"),
    (["segment", "image.png", "Segment it.", "--model", "tiny", "--max-new-tokens", "0"], "--max-new-tokens",
     "at least 1"),
    (["segment", "image.png", "Segment it.", "--model", "tiny", "--out", "empty_folder"], "--out empty_folder",
     "is a folder"),
    (["segment", "image.png", "Segment it.", "--model", "tiny", "--refine-sam", "sam.pth"], "--refine-sam sam.pth",
     "no such file"),
    (["segment", "image.png", "Segment it.", "--model", "tiny", "--refine-sam", "facebook/sam-vit-huge"],
     "--refine-sam facebook/sam-vit-huge", "SAM model"),
    (["chat", "image.png", "--model", "tiny", "--out-dir", "notes.txt"], "--out-dir notes.txt", "is a file"),
    (["chat", "image.png", "--model", "tiny", "--device", "gpu0"], "--device gpu0", "not a torch device"),
    (["demo", "--model", "tiny", "--concurrency", "0"], "--concurrency", "at least 1"),
    (["demo", "--model", "tiny", "--port", "70000"], "--port", "1..65535"),
    (["push", "notes.txt", "me/x"], "FOLDER notes.txt", "is a file"),
    (["push", "no_such_run", "me/x"], "FOLDER no_such_run", "no such folder"),
    (["push", "tiny", "me/x"], "publish tiny to me/x", "HF_HUB_OFFLINE"),
    (["init", "./no_base", "out"], "BASE ./no_base", "no such folder"),
    (["convert", "notes.txt", "out"], "SOURCE notes.txt", "is a file"),
    (["eval", "--data", "missing.jsonl", "--output", "out"], "--data missing.jsonl", "no such data file or folder"),
    (["eval", "--model", "./no_such_model", "--data", "notes.txt", "--output", "out"], "--model ./no_such_model",
     "no such folder"),
    (["eval", "--device", "banana", "--data", "notes.txt", "--output", "out"], "--device banana", "not a torch device"),
    (["eval", "--data", "notes.txt", "--output", "out", "--batch-size", "0"], "--batch-size", "at least 1"),
    (["eval", "--data", "notes.txt", "--output", "notes.txt"], "--output notes.txt", "is a file"),
    (["eval", "--data", "notes.txt", "--output", "out", "--images", "image.png"], "--images image.png", "is a file"),
    (["train", "missing.yaml"], "CONFIG missing.yaml", "no such config file"),
    (["train", "empty_folder"], "CONFIG empty_folder", "is a folder"),
    (["prepare-data", "--data", "missing", "--output", "x.jsonl"], "--data missing", "no such data file or folder"),
    (["prepare-data", "--data", "notes.txt", "--output", "x.jsonl", "--repeats", "0"], "--repeats", "at least 1"),
]


@pytest.mark.parametrize("case", PRE_TORCH, ids=[" ".join(case[0]) for case in PRE_TORCH])
def test_argument_errors_are_one_line_before_torch(workdir, case):
    args, *fragments = case
    before = snapshot(workdir)
    result, seconds = probe(workdir, *args)
    assert_one_line(result, args[0], *fragments)
    assert result.stdout.split() == ["False"], "torch was imported before the argument error"
    assert seconds < 10, seconds  # well under 1 s on an idle machine (benchmarks/breakdown.py); shared CI is slower
    assert snapshot(workdir) == before  # nothing written, the user's files as they were


def test_a_busy_port_is_named_before_the_model_loads(workdir):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        result, _ = probe(workdir, "demo", "--model", "tiny", "--port", str(port))
    message = assert_one_line(result, "demo", f"--port {port}", "in use")
    assert "GRADIO_SERVER_PORT" not in message and result.stdout.split() == ["False"]


@pytest.mark.parametrize("taken_after_check", [1, 2], ids=["while the model loads", "between check and bind"])
def test_a_port_taken_after_the_first_check_is_named_in_one_line(workdir, monkeypatch, capsys, taken_after_check):
    """Another server takes the port after stamp-hf demo checked it: during the model load (the second check names
    it) or in the instant before gradio binds (gradio's error, "Cannot find empty port ... GRADIO_SERVER_PORT", is
    turned into the same line)."""
    pytest.importorskip("gradio")
    from stamp_hf.commands import demo

    port = free_tcp_port()
    real_check, calls, server = demo.check_port, [], socket.socket()

    def check_then_take(host, number, option="--port"):
        real_check(host, number, option)
        calls.append(number)
        if len(calls) == taken_after_check:
            server.bind((host, number))
            server.listen()

    monkeypatch.setattr(demo, "check_port", check_then_take)
    monkeypatch.chdir(workdir)
    with server:
        assert main(["demo", "--model", "tiny", "--port", str(port)]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading lines
    assert message == (f"stamp-hf demo: error: --port {port}: the port is in use on 127.0.0.1 (another server?); stop "
                       "it or pick another --port")
    assert len(calls) == taken_after_check


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_is_one_line_within_the_stated_time(workdir):
    """This machine has no network: without HF_HUB_OFFLINE a Hub id fails in one line naming what was fetched,
    within HF_HUB_ETAG_TIMEOUT (here 3 s), not huggingface_hub's minute of retries."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "3")
    try:
        for args, fragments in [
            (["segment", "image.png", "x", "--model", "someone/nothing"], ["--model someone/nothing", "the model", "Hub"]),
            (["segment", "image.png", "x", "--model", "tiny", "--refine-sam", "facebook/sam-vit-huge"],
             ["--refine-sam facebook/sam-vit-huge", "the SAM model"]),
            (["init", "Qwen/Qwen2-VL-2B-Instruct", "out"], ["BASE Qwen/Qwen2-VL-2B-Instruct", "the base model"]),
            (["push", "tiny", "me/x"], ["cannot publish tiny to me/x", "Hub is unreachable"]),
        ]:
            result, seconds = probe(workdir, *args, offline=False)
            if "unreachable" not in result.stderr and "cannot fetch" not in result.stderr:
                pytest.skip(f"this machine reaches the Hub: {result.stderr[-300:]}")
            assert_one_line(result, args[0], *fragments)
            assert seconds < 20 and result.stdout.split() == ["False"], seconds
    finally:
        if os.environ.get("HF_HUB_ETAG_TIMEOUT") == "3":
            del os.environ["HF_HUB_ETAG_TIMEOUT"]


def test_network_errors_are_one_line(capsys):
    import httpx2

    from stamp_hf.cli import CommandError, network_errors

    with pytest.raises(CommandError, match=r"^cannot publish a to b: network error \(ConnectError: down\)$"):
        with network_errors("publish a to b"):
            raise httpx2.ConnectError("down")


# ------------------------------------------------------------------------------------------------------ transformers


def load_configuration_module():
    spec = importlib.util.spec_from_file_location("configuration_stamp_probe", ROOT / "configuration_stamp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_unsupported_transformers_is_one_line_naming_both_versions(monkeypatch):
    monkeypatch.setattr(transformers, "__version__", "4.57.1")  # the official STAMP code's pin
    with pytest.raises(ImportError) as error:
        load_configuration_module()
    message = str(error.value)
    assert "\n" not in message
    assert message == ("STAMP's model code needs transformers>=5.25,<6, but transformers 4.57.1 is installed; install "
                       "a supported one: pip install 'transformers>=5.25,<6'")
    monkeypatch.setattr(transformers, "__version__", "6.0.0")
    with pytest.raises(ImportError, match="transformers 6.0.0 is installed"):
        load_configuration_module()
    monkeypatch.undo()
    assert load_configuration_module().TRANSFORMERS_RANGE == "transformers>=5.25,<6"


def test_the_declared_floor_is_the_checked_range_and_the_card_and_readme_state_it():
    import tomllib

    module = load_configuration_module()
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert module.TRANSFORMERS_RANGE in dependencies
    assert transformers.__version__.startswith("5.25")  # the floor is the release this suite runs on
    for path in ("README.md", "hub_cards/stamp_model_card.md"):
        assert module.TRANSFORMERS_RANGE in (ROOT / path).read_text(), path


# ------------------------------------------------------------------------------------------------------ chat


def test_chat_json_and_out_dir(workdir):
    result = subprocess.run([str(SCRIPT), "chat", "image.png", "--model", "tiny", "--json", "--out-dir", "masks"],
                            cwd=workdir, input="Please segment the cat.\n\nAnd again?\n", capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(t["turn"], t["question"], t["answer"]) for t in turns] == [
        (1, "Please segment the cat.", " it is<|seg|>"), (2, "And again?", " it is<|seg|>")]
    from pycocotools import mask as coco_mask

    for turn in turns:
        (entry,) = turn["masks"]
        assert entry["label"] == "it is" and entry["size"] == [50, 150] and 0 <= entry["score"] <= 1
        decoded = coco_mask.decode({"size": entry["size"], "counts": entry["rle"].encode()}).astype(bool)
        written = np.asarray(Image.open(workdir / entry["file"])) > 127
        assert entry["file"] == f"masks/turn_{turn['turn']}_mask_0.png" and np.array_equal(decoded, written)
    plain = subprocess.run([str(SCRIPT), "chat", "image.png", "--model", "tiny"], cwd=workdir,
                           input="Please segment the cat.\n", capture_output=True, text=True, timeout=300)
    assert plain.stdout.splitlines()[:2] == ["you> Please segment the cat.", "stamp>  it is<|seg|>"], plain.stdout


def test_masks_json_rle_is_pycocotools_bytes():
    from pycocotools import mask as coco_mask

    from stamp_hf.masks_json import rle_counts

    rng = np.random.default_rng(0)
    for k in range(50):
        mask = rng.random(tuple(rng.integers(1, 40, 2))) < (k % 5) / 4
        expected = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
        assert rle_counts(mask) == expected


# ------------------------------------------------------------------------------------------------------ prompts


def test_an_empty_prompt_is_refused_everywhere_with_one_message(workdir, capsys):
    from stamp_hf.conversation import Conversation
    from stamp_hf.pipeline_stamp import check_prompt

    with pytest.raises(ValueError) as error:
        check_prompt("  ")
    message = str(error.value)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        assert main(["segment", "image.png", " ", "--model", "tiny"]) == 2
    finally:
        os.chdir(cwd)
    assert capsys.readouterr().err.strip() == f"stamp-hf segment: error: {message}"
    model, processor = tiny_stamp(seed=1)
    with pytest.raises(ValueError, match="^" + message.split(":")[0]):
        Conversation(model, processor, random_image(40, 40)).ask("")


# ------------------------------------------------------------------------------------------------------ files


def test_saved_weights_follow_the_umask(tmp_path):
    model, _ = tiny_stamp(seed=1)
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "saved")
    finally:
        os.umask(old)
    assert (tmp_path / "saved" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_one_rule_says_what_a_hub_repo_id_is_for_the_commands_and_the_library(tmp_path, monkeypatch):
    """stamp_hf.repo_ids.REPO_ID decides for the commands' argument checks (before torch loads), the checkpoint loader
    and the training config alike: `[org/]name`, never a path written as one ("./", "../", "~/", "/")."""
    from stamp_hf.checkpoints import is_repo_id
    from stamp_hf.commands._checks import check_source
    from stamp_hf.cli import CommandError
    from stamp_hf.training import TrainConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("{}\n")
    ids, paths = ("gpt2", "Qwen/Qwen2-VL-2B-Instruct", "org/name.v1_2"), ("./model", "../model", "~/model", "/model",
                                                                          "org/name/x", "a--b/c", "org/na..me", "-x")
    for text in ids:
        assert is_repo_id(text), text
        TrainConfig(model=text, data="data.jsonl", output_dir="out").check_paths()  # looked up when it loads
    for text in paths:
        assert not is_repo_id(text), text
        with pytest.raises(FileNotFoundError, match="no such folder"):
            TrainConfig(model=text, data="data.jsonl", output_dir="out").check_paths()
        with pytest.raises(CommandError, match="no such folder"):
            check_source(text, "--model", "model")
