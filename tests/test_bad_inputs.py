"""Bad input, as a new user gives it, through the CLI and the Python API: a one-line error naming the problem (exit
status 2, no traceback; a ValueError / TypeError / OSError with the same text in Python) or the right answer, files
the user already has byte-identical afterwards, and nothing half-written."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import chat, random_image
from stamp_hf.cli import main
from stamp_hf.prepare import prepare_data
from stamp_hf.processing_stamp import load_image, left_padded_batch
from stamp_hf.testing import answer_with_masks, tiny_stamp
from stamp_hf.training import train

SCRIPT = Path(sys.executable).parent / "stamp-hf"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs")
    model, processor = tiny_stamp(seed=1)
    answer_with_masks(model, processor, segs=1)  # the tiny model answers " it is<|seg|>": one mask per request
    model.save_pretrained(folder / "tiny")
    processor.save_pretrained(folder / "tiny")
    random_image(50, 150, seed=11).save(folder / "image.png")
    Image.new("RGB", (5, 1100), "white").save(folder / "thin.png")
    (folder / "keep.png").write_bytes(b"the user's own file")
    return folder


def run_cli(workdir, *args):
    """main() as the console script runs it, in this process: (exit status, stderr)."""
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return main(list(args))
    finally:
        os.chdir(cwd)


def one_line_error(capsys, status, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err and err[-1].startswith("stamp-hf "), err
    message = err[-1]
    assert "Traceback" not in "\n".join(err)
    for fragment in fragments:
        assert fragment in message, message
    return message


def snapshot(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


# ------------------------------------------------------------------------------------------------------ images


def test_a_16_bit_png_gives_the_mask_of_its_8_bit_conversion(tmp_path):
    """A mode I;16 PNG was read as a white image; now its 65535 range maps to 255, so the demo model segments it as
    it segments the 8-bit image."""
    from stamp_hf.demo_model import load_demo_model
    from transformers import pipeline

    grey8 = np.asarray(Image.open(Path(__file__).parents[1] / "examples" / "shapes.png").convert("L"))
    Image.fromarray(grey8).save(tmp_path / "grey8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    assert np.array_equal(np.asarray(load_image(tmp_path / "grey16.png")), np.asarray(load_image(tmp_path / "grey8.png")))

    model, processor = load_demo_model()
    segment = pipeline("stamp-segmentation", model=model, processor=processor)
    # a request that needs no colour (the image is grey) for a shape the scene has (its four shapes are all small)
    results = [segment(str(tmp_path / name), "Please segment the star.", max_new_tokens=16)
               for name in ("grey8.png", "grey16.png")]
    assert results[0]["text"] == results[1]["text"] and len(results[0]["masks"]) == len(results[1]["masks"]) >= 1
    for a, b in zip(results[0]["masks"], results[1]["masks"]):
        assert np.array_equal(np.asarray(a["mask"]), np.asarray(b["mask"])) and np.asarray(a["mask"]).any()


def test_image_modes_and_arrays_come_out_rgb_from_their_real_range():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: the white background shows
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.full((4, 4), 0.5, np.float32)).getpixel((0, 0)) == (128, 128, 128)
    assert load_image(np.full((4, 4, 3), 65535, np.uint16)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("F", (4, 4), 1.0)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(TypeError, match="path, URL, PIL image, numpy array or bytes"):
        load_image(42)
    with pytest.raises(ValueError, match=r"shape \(3, 4, 7\)"):
        load_image(np.zeros((3, 4, 7), np.uint8))


def test_exif_orientation_is_applied_for_users_and_kept_for_dataset_annotations(tmp_path):
    image = Image.new("RGB", (30, 10), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (10, 30)  # what a person sees
    stored = load_image(tmp_path / "rotated.jpg", upright=False)
    assert stored.size == (30, 10)  # what COCO masks are drawn on
    assert load_image(stored).size == (30, 10)  # a loaded image is final: encode_chat's second pass keeps it as is


def test_image_file_bytes_load_like_the_file_upright_with_one_line_errors(tmp_path):
    """What a server receives: the bytes of a PNG, JPEG or WebP file, read like the file itself (EXIF included)."""
    image = Image.new("RGB", (30, 10), "red")
    exif = image.getexif()
    exif[0x0112] = 6
    for suffix in ("png", "jpg", "webp"):
        image.save(tmp_path / f"rotated.{suffix}", exif=exif)
        data = (tmp_path / f"rotated.{suffix}").read_bytes()
        for source in (data, bytearray(data), memoryview(data)):
            assert np.array_equal(np.asarray(load_image(source)), np.asarray(load_image(tmp_path / f"rotated.{suffix}")))
    assert load_image(data).size == (10, 30)
    with pytest.raises(ValueError, match=r"^the image data \(5 bytes\): cannot read it as an image \(not a format"):
        load_image(b"hello")
    with pytest.raises(ValueError, match=r"^the image data \(20 bytes\): cannot read it as an image \(.*(?i:truncated)"):
        load_image((tmp_path / "rotated.png").read_bytes()[:20])
    Image.new("RGB", (1000, 3)).save(tmp_path / "thin.png")
    with pytest.raises(ValueError, match=r"^the image data \(\d+ bytes\): 1000x3 px is too thin"):
        load_image((tmp_path / "thin.png").read_bytes())


def test_an_animated_image_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("blue", "red")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert load_image(tmp_path / "anim.gif").getpixel((0, 0)) == (0, 0, 255)


def test_a_url_is_not_fetched_offline(workdir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = "http://images.example/cat.png"
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        load_image(url)
    one_line_error(capsys, run_cli(workdir, "segment", url, "Segment the cat.", "--model", "tiny"), url, "HF_HUB_OFFLINE")


def test_a_thin_image_is_refused_before_the_model_loads(workdir, capsys):
    status = run_cli(workdir, "segment", "thin.png", "Segment the cat.", "--model", "tiny")
    one_line_error(capsys, status, "thin.png", "5x1100", "aspect ratio")
    assert "loaded" not in capsys.readouterr().err  # the model was never loaded


@pytest.mark.parametrize("name, content, fragment", [("missing.png", None, "no such image file"),
                                                      ("notes.png", b"plain text", "cannot read it as an image")])
def test_a_missing_or_non_image_file_is_named(workdir, capsys, name, content, fragment):
    if content is not None:
        (workdir / name).write_bytes(content)
    one_line_error(capsys, run_cli(workdir, "segment", name, "Segment it.", "--model", "tiny"), name, fragment)
    with pytest.raises((OSError, ValueError), match=fragment):
        load_image(workdir / name)


# ------------------------------------------------------------------------------------------------------ weights


def test_pickled_weights_are_refused_unless_allowed(workdir, capsys, tmp_path):
    from transformers import AutoModel, pipeline

    folder = tmp_path / "pickled"
    (workdir / "tiny").rename(folder)  # borrowed, given back below
    try:
        state = AutoModel.from_pretrained(folder).state_dict()
        (folder / "model.safetensors").rename(tmp_path / "model.safetensors")
        torch.save(state, folder / "pytorch_model.bin")
        status = run_cli(workdir, "segment", "image.png", "Segment it.", "--model", str(folder))
        one_line_error(capsys, status, "pytorch_model.bin", "allow_pickle")
        with pytest.raises((OSError, ValueError), match="holds only pickled weights"):  # the pipeline wraps it
            pipeline("stamp-segmentation", model=str(folder), trust_remote_code=True)
        assert run_cli(workdir, "segment", "image.png", "Segment it.", "--model", str(folder), "--allow-pickle") == 0
        (folder / "pytorch_model.bin").unlink()
        (tmp_path / "model.safetensors").rename(folder / "model.safetensors")
    finally:
        folder.rename(workdir / "tiny")


def test_a_truncated_safetensors_file_is_one_line(workdir, capsys, tmp_path):
    from transformers import AutoModel

    folder = tmp_path / "truncated"
    folder.mkdir()
    for file in (workdir / "tiny").iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    status = run_cli(workdir, "segment", "image.png", "Segment it.", "--model", str(folder))
    one_line_error(capsys, status, str(folder), "truncated or corrupt")
    with pytest.raises(OSError, match="truncated or corrupt"):
        AutoModel.from_pretrained(folder)


@pytest.mark.parametrize("device, fragment", [("banana", "not a torch device"), ("cuda", "no CUDA device")])
def test_an_unusable_device_is_one_line(workdir, capsys, device, fragment):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    status = run_cli(workdir, "segment", "image.png", "Segment it.", "--model", "tiny", "--device", device)
    one_line_error(capsys, status, f"--device {device}", fragment)


# ------------------------------------------------------------------------------------------------------ outputs


def test_a_failed_command_writes_nothing_and_keeps_the_users_files(workdir, capsys):
    before = snapshot(workdir)
    status = run_cli(workdir, "segment", "image.png", "Segment it.", "--model", "tiny", "--out", "mask.png",
                     "--overlay", "missing/overlay.png")
    one_line_error(capsys, status, "missing/overlay.png", "does not exist")
    assert snapshot(workdir) == before  # no mask.png left behind
    status = run_cli(workdir, "segment", "image.png", "x" * 100_000, "--model", "tiny", "--out", "keep.png", "--force")
    one_line_error(capsys, status, "tokens, over the model's context of 4096 tokens")
    assert snapshot(workdir) == before  # --force, but the command failed: the user's keep.png is untouched


@pytest.mark.parametrize("out, fragment", [(".", "is a folder"), ("mask.xyz", "unknown image file extension")])
def test_an_unusable_out_path_is_named(workdir, capsys, out, fragment):
    before = snapshot(workdir)
    one_line_error(capsys, run_cli(workdir, "segment", "image.png", "Segment it.", "--model", "tiny", "--out", out),
                   "--out", fragment)
    assert snapshot(workdir) == before


def test_existing_outputs_need_force_and_are_replaced_whole(workdir, capsys):
    one_line_error(capsys, run_cli(workdir, "segment", "image.png", "Segment it.", "--model", "tiny", "--out",
                                   "keep.png"), "keep.png exists", "--force")
    assert (workdir / "keep.png").read_bytes() == b"the user's own file"
    try:
        assert run_cli(workdir, "segment", "image.png", "Segment it.", "--model", "tiny", "--out", "keep.png",
                       "--force") == 0
        assert Image.open(workdir / "keep.png").size == (150, 50)
        assert not [p for p in workdir.iterdir() if p.name.endswith(".tmp")]
    finally:
        (workdir / "keep.png").write_bytes(b"the user's own file")


# ------------------------------------------------------------------------------------------------------ generation


def test_a_prompt_over_the_context_is_refused_with_both_lengths(workdir):
    model, processor = tiny_stamp(seed=1)
    inputs = chat(processor, random_image(40, 40), "word " * 5000)
    with pytest.raises(ValueError, match=r"the prompt is \d+ tokens, over the model's context of 4096 tokens"):
        model.generate_with_masks(**inputs, max_new_tokens=2)


def test_batches_that_do_not_line_up_are_refused(tiny):
    model, processor = tiny
    first, second = chat(processor, random_image(40, 60, 1)), chat(processor, random_image(60, 40, 2), "Hi there.")
    batch = left_padded_batch(processor, [first, second])
    one_image = {**batch, "pixel_values": first["pixel_values"], "image_grid_thw": first["image_grid_thw"]}
    with pytest.raises(ValueError, match="hold 2 image.s. but image_grid_thw describes 1"):
        model.generate_with_masks(**one_image, max_new_tokens=2)
    patches = {**batch, "pixel_values": first["pixel_values"]}
    with pytest.raises(ValueError, match="pixel_values hold .* patches but image_grid_thw describes"):
        model.generate_with_masks(**patches, max_new_tokens=2)
    moved = {}  # the same batch padded on the right, as the tokenizer pads by default
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        keep = batch["attention_mask"].bool()
        moved[key] = torch.stack([torch.cat([row[k], row[~k]]) for row, k in zip(batch[key], keep)])
    right_padded = {**batch, **moved}
    with pytest.raises(ValueError, match="padded on the right .* pad on the left"):
        model.generate_with_masks(**right_padded, max_new_tokens=2)


def test_the_teacher_forced_forward_refuses_what_it_would_ignore(tiny):
    model, processor = tiny
    inputs = chat(processor, random_image(40, 40))
    with pytest.raises(TypeError, match=r"does not take \['cache', 'position_ids'\]"):
        model(**inputs, mask_labels=[[]], position_ids=torch.zeros(1), cache=object())


# ------------------------------------------------------------------------------------------------------ the CLI itself


def test_version_and_help_start_without_torch():
    probe = ("import sys; from stamp_hf.cli import build_parser; build_parser(); "
             "print('torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "False"], result.stderr
    version = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.strip().startswith("stamp-hf 0.")


def test_a_bad_input_in_a_real_process_is_one_line_without_traceback(workdir):
    result = subprocess.run([str(SCRIPT), "segment", "thin.png", "Segment it.", "--model", "tiny"], cwd=workdir,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "aspect ratio" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------------ Python API

def _train_settings(workdir, **changes):
    settings = dict(model=str(workdir / "tiny"), data=str(workdir / "train.jsonl"), output_dir=str(workdir / "run"))
    return {**settings, **changes}


PYTHON_API = {  # name -> (call on workdir, exception type, the words of its one line)
    "a training value that is no number": (
        lambda w: train(
            _train_settings(w, training={"learning_rate": "fast"})),
        ValueError, "training.learning_rate must be a number, got 'fast'"),
    "a TrainingArguments field at the top": (
        lambda w: train(_train_settings(w, learning_rate=1e-4)),
        ValueError, "learning_rate is a TrainingArguments setting: put it under training:"),
    "a model folder that does not exist": (
        lambda w: train(_train_settings(w, model="./no_such_model")),
        FileNotFoundError, "model ./no_such_model: no such folder"),
    "a model that is a file": (
        lambda w: train(_train_settings(w, model=str(w / "keep.png"))),
        ValueError, "keep.png is a file; give the checkpoint's folder"),
    "training data that does not exist": (
        lambda w: train(_train_settings(w, data=str(w / "none.jsonl"))),
        FileNotFoundError, "data " + "{w}/none.jsonl: no such data file"),
    "evaluation data that is a folder": (
        lambda w: train(_train_settings(w, eval_data=str(w / "tiny"))),
        ValueError, "eval_data {w}/tiny is a folder; give the .jsonl file"),
    "an image path that is a folder": (
        lambda w: load_image(str(w / "tiny")), IsADirectoryError, "{w}/tiny is a folder, not an image file"),
    "prepare-data on a missing dataset": (
        lambda w: prepare_data(w / "missing", w / "out.jsonl"),
        FileNotFoundError, "no such data file or folder: {w}/missing"),
}


@pytest.mark.parametrize("case", list(PYTHON_API))
def test_python_api_errors_are_one_line_naming_the_setting_and_leave_nothing(workdir, case):
    """The cases the CLI reports in one line, through the Python API: the exception's text is that line, it names
    the setting or file, no output folder is left and the user's files are byte-identical."""
    call, kind, words = PYTHON_API[case]
    (workdir / "train.jsonl").touch()  # the user's (empty) training data
    before = snapshot(workdir)
    with pytest.raises(kind) as raised:
        call(workdir)
    message = str(raised.value)
    assert "\n" not in message and words.format(w=workdir) in message, message
    assert snapshot(workdir) == before
    assert not (workdir / "run").exists() and not (workdir / "out.jsonl").exists()
