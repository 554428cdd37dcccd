"""The JSON Lines training format: records, masks in every encoding, labels on assistant tokens only, the collator."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from shapes_data import one_thread, SHAPES, shape_mask, write_shapes_dataset  # noqa: F401 (fixture)
from stamp_hf.data import IGNORE_INDEX, STAMPCollator, STAMPDataset, encode_record, load_mask, read_records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_labels_cover_exactly_the_assistant_turns(tiny):
    model, processor = tiny
    tokenizer = processor.tokenizer
    messages = [
        {"role": "system", "content": "You segment things <|seg|>."},
        {"role": "user", "content": "Segment <|seg|> the <|image_pad|> cat."},
        {"role": "assistant", "content": "Sure, it is <|seg|>."},
        {"role": "user", "content": "And the dogs?"},
        {"role": "assistant", "content": "Here <|seg|> and <|seg|>."},
    ]
    item = encode_record(processor, Image.new("RGB", (140, 84)), messages)
    ids, labels = item["input_ids"], item["labels"]
    # control tokens typed in system/user turns stay text: only the assistant's three <|seg|> and one image slot
    assert int((ids == model.config.seg_token_id).sum()) == 3
    assert int((ids == processor.image_token_id).sum()) == 15 == processor.num_placeholders(item["image_grid_thw"][0])
    assert torch.equal(item["mm_token_type_ids"], (ids == processor.image_token_id).long())
    # every labelled token is the token itself; the labelled text is exactly the assistant turns + their end-of-turn
    kept = labels != IGNORE_INDEX
    assert torch.equal(labels[kept], ids[kept])
    assert tokenizer.decode(ids[kept]) == "Sure, it is <|seg|>.<|im_end|>\nHere <|seg|> and <|seg|>.<|im_end|>\n"
    # and the labelled tokens form exactly two runs, each starting right after "<|im_start|>assistant\n"
    starts = torch.nonzero(kept[1:] & ~kept[:-1]).flatten() + 1
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert len(starts) == 2
    for start in starts.tolist():
        assert ids[start - len(header) : start].tolist() == header


def test_encoding_matches_the_processor_on_plain_text(tiny):
    """Same tokens and pixels as processor.apply_chat_template when nothing needs sanitizing."""
    _, processor = tiny
    image = Image.fromarray((np.random.RandomState(0).rand(90, 150, 3) * 255).astype("uint8"))
    messages = [{"role": "user", "content": "Where is the cat?"}, {"role": "assistant", "content": "On the left."}]
    item = encode_record(processor, image, messages)
    reference = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Where is the cat?"}]},
         {"role": "assistant", "content": "On the left."}],
        tokenize=True, return_dict=True, return_tensors="pt",
    )
    assert torch.equal(item["input_ids"], reference["input_ids"][0])
    assert torch.equal(item["mm_token_type_ids"], reference["mm_token_type_ids"][0].long())
    torch.testing.assert_close(item["pixel_values"], reference["pixel_values"])
    assert torch.equal(item["image_grid_thw"], reference["image_grid_thw"])


def test_mask_target_lines_up_with_the_patch_grid_of_a_non_square_image(tiny, tmp_path):
    model, processor = tiny
    # 84 x 140 px = a 3 x 5 grid of 28 px merged patches (no resize); foreground exactly on patch (row 1, col 3)
    mask = np.zeros((84, 140), dtype=np.uint8)
    mask[28:56, 84:112] = 255
    Image.new("RGB", (140, 84), "white").save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    record = {
        "image": "image.png",
        "messages": [{"role": "user", "content": "Segment it."}, {"role": "assistant", "content": "It is <|seg|>."}],
        "masks": [{"png": "mask.png"}],
    }
    dataset = STAMPDataset(write_jsonl(tmp_path / "data.jsonl", [record]), processor)
    batch = STAMPCollator(processor)([dataset[0]])
    expected = torch.zeros(1, 3, 5)
    expected[0, 1, 3] = 1
    assert torch.equal(batch["mask_labels"][0], expected)
    # the model's logits for that <|seg|> come on the same (rows, cols) grid, so the loss compares patch with patch
    out = model(**batch)
    assert out.mask_logits[0][0].shape == (3, 5)
    torch.testing.assert_close(out.loss, out.text_loss + out.mask_loss)
    # for the loss at image resolution the label stays at the pixels of the image the model sees
    pixels = STAMPDataset(dataset.path, processor, mask_loss_resolution="image")[0]["mask_labels"]
    assert torch.equal(pixels, torch.from_numpy(mask[None] > 0).float())
    with pytest.raises(ValueError, match="mask_loss_resolution must be one of"):
        STAMPDataset(dataset.path, processor, mask_loss_resolution="grid")


def test_collator_batches_images_of_different_sizes(tiny, tmp_path):
    model, processor = tiny
    dataset = STAMPDataset(write_shapes_dataset(tmp_path), processor)
    items = [dataset[i] for i in range(len(dataset))]
    batch = STAMPCollator(processor)(items)
    lengths = [len(i["input_ids"]) for i in items]
    assert len(set(lengths)) > 1  # different images, different numbers of placeholders
    assert batch["input_ids"].shape == (4, max(lengths))
    for row, (item, n) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert batch["image_grid_thw"].tolist() == [i["image_grid_thw"][0].tolist() for i in items]
    assert batch["pixel_values"].shape[0] == sum(int(i["image_grid_thw"].prod()) for i in items)
    for (size, box, _, _), target in zip(SHAPES, batch["mask_labels"]):
        grid_box = tuple(v // 28 for v in box)
        assert torch.equal(target[0].bool(), torch.from_numpy(shape_mask((size[0] // 28, size[1] // 28), grid_box)))
    # the batch runs through the model as is, every sample padded on the right
    out = model(**batch)
    assert [len(m) for m in out.mask_logits] == [1, 1, 1, 1]
    assert torch.isfinite(out.loss)


def uncompressed_rle(mask):
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a background run."""
    counts, current, run = [], 0, 0
    for value in mask.flatten(order="F").astype(int):
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    return counts + [run]


def test_every_mask_encoding_gives_the_same_mask(tmp_path):
    from pycocotools import mask as mask_utils

    size = (60, 80)  # (height, width)
    truth = shape_mask(size, (10, 20, 40, 50))
    Image.fromarray(truth.astype(np.uint8) * 7).save(tmp_path / "m.png")  # any nonzero value is foreground
    rle = mask_utils.encode(np.asfortranarray(truth.astype(np.uint8)))
    compressed = {"size": rle["size"], "counts": rle["counts"].decode()}
    counts = uncompressed_rle(truth)
    specs = {
        "png": {"png": "m.png"},
        "rle": {"rle": compressed},
        "uncompressed rle": {"rle": {"size": list(size), "counts": counts}},
        "polygon": {"polygons": [[20, 10, 50, 10, 50, 40, 20, 40]]},
    }
    for name, spec in specs.items():
        mask = load_mask(spec, (80, 60), tmp_path, name)
        assert mask.shape == size and mask.dtype == bool, name
        if name == "polygon":  # COCO polygons rasterize edges by pixel coverage: equal up to the boundary
            assert (mask != truth).sum() <= 2 * (30 + 30) + 1, name
            assert mask[11:39, 21:49].all() and not mask[:9].any(), name
        else:
            assert np.array_equal(mask, truth), name
    assert not load_mask({"empty": True}, (80, 60), tmp_path, "empty").any()


def test_bad_records_name_the_file_line_and_problem(tmp_path, tiny):
    _, processor = tiny
    Image.new("RGB", (56, 56)).save(tmp_path / "i.png")
    Image.new("L", (28, 28)).save(tmp_path / "small.png")
    ok = {"role": "user", "content": "Segment it."}
    cases = [
        ({"image": "i.png", "messages": [ok, {"role": "assistant", "content": "<|seg|> <|seg|>"}],
          "masks": [{"empty": True}]}, r"data.jsonl:1: 2 <\|seg\|> in the assistant turns but 1 masks"),
        ({"image": "i.png", "messages": [ok, {"role": "assistant", "content": "<|seg|>"}], "masks": [{"png": "small.png"}]},
         r"data.jsonl:1 mask 0: mask .*small.png is 28x28 but the image is 56x56"),
        ({"image": "i.png", "messages": [ok, {"role": "assistant", "content": "<|seg|>"}],
          "masks": [{"rle": {"size": [5, 5], "counts": "x"}}]}, r"RLE size \[5, 5\] but the image is \[56, 56\]"),
        ({"image": "missing.png", "messages": [ok]}, r"data.jsonl:1: .*missing.png: no such image file"),
        ({"messages": [ok]}, r"data.jsonl:1: a record needs 'image' and 'messages'"),
    ]
    for record, message in cases:
        path = write_jsonl(tmp_path / "data.jsonl", [record])
        with pytest.raises((ValueError, OSError), match=message):
            STAMPDataset(path, processor)[0]
    (tmp_path / "data.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"data.jsonl:1: not valid JSON"):
        read_records(tmp_path / "data.jsonl")


def test_vqa_records_mix_with_segmentation_records(tiny, tmp_path):
    model, processor = tiny
    Image.new("RGB", (56, 84)).save(tmp_path / "i.png")
    question = {"role": "user", "content": "How many shapes are there?"}
    records = [
        {"image": "i.png", "messages": [question, {"role": "assistant", "content": "Three."}]},
        {"image": "i.png", "messages": [question, {"role": "assistant", "content": "Three, <|seg|>."}],
         "masks": [{"empty": True}]},
    ]
    dataset = STAMPDataset(write_jsonl(tmp_path / "data.jsonl", records), processor)
    batch = STAMPCollator(processor)([dataset[0], dataset[1]])
    assert [tuple(m.shape) for m in batch["mask_labels"]] == [(0, 3, 2), (1, 3, 2)]
    assert not batch["mask_labels"][1].any()  # an empty mask is all background
    out = model(**batch)
    assert torch.isfinite(out.loss) and [len(m) for m in out.mask_logits] == [0, 1]


def test_dataset_indexes_its_files_and_reads_each_record_when_asked(tiny, tmp_path):
    _, processor = tiny
    png = write_shapes_dataset(tmp_path / "png")
    polygons = write_shapes_dataset(tmp_path / "polygons", mask_format="polygons")
    polygons.write_text("\n" + polygons.read_text())  # a blank line: skipped, later line numbers unchanged
    dataset = STAMPDataset([png, polygons], processor)  # several files read as one data set
    assert len(dataset) == 8
    assert dataset.record(5).where == f"{polygons}:3" and "polygons" in dataset.record(5).masks[0]
    for k in range(4):  # the same shapes in both files, as PNG and as polygons: the same labels
        assert torch.equal(dataset[k]["mask_labels"], dataset[4 + k]["mask_labels"])
    # the index holds byte offsets, not records: an edit of the same length after indexing is what an item reads
    png.write_text(png.read_text().replace("the red square", "the RED square"))
    assert dataset.record(0).messages[0]["content"] == "Please segment the RED square."
    with pytest.raises(IndexError, match="record 8 out of range"):
        dataset.record(8)
    # a bad line anywhere is still found when the dataset is made, named by file and line
    polygons.write_text(polygons.read_text() + '{"image": "images/0.png"}\n')
    with pytest.raises(ValueError, match=rf"{polygons}:6: a record needs 'image' and 'messages'"):
        STAMPDataset([png, polygons], processor)
