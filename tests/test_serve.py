"""`stamp-hf serve` as clients meet it: the real command started once for the module as a subprocess (real Ray,
local, two replicas of the bundled demo model, batching on) on a free port of 127.0.0.1, stopped with SIGTERM at the
end. The true mask of examples/shapes.png comes from the drawn held-out set's routine (as in tests/test_webdemo.py)."""

import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve", reason='the serve extra is not installed (pip install -e ".[serve]")')
from pycocotools import mask as coco_mask  # noqa: E402

from stamp_hf.serve_limits import MAX_BODY_BYTES, MAX_TEXT_BYTES  # noqa: E402

from example_scene import ANSWER, LABEL, REQUEST, SHAPES, free_port, iou, true_mask, without_module  # noqa: E402

IOU_FLOOR = 0.8
PROMPTS = ("Please segment the red circle.", "Please segment the blue triangle.", "Please segment the green square.",
           "Is the star big or small?")
SIZES = ((320, 240), (200, 150), (256, 256), (180, 300))  # shapes.png resized: different grids, different lengths


def running_server(log_path: Path, *options: str):
    """Start `stamp-hf serve` on a free port of 127.0.0.1 with `options`, yield its URL, stop it with SIGTERM; its
    log is shown if it fails to start or to stop."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    script = Path(sys.executable).with_name("stamp-hf")
    command = [str(script), "serve", "--host", "127.0.0.1", "--port", str(port), *options]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=5).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                pytest.fail(f"stamp-hf serve did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    process.terminate()  # SIGTERM to the command alone: it shuts Serve and its own Ray down
    try:
        assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "stopping" in log_path.read_text()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The URL of `stamp-hf serve --replicas 2` (demo model, batches of up to 8 waiting 100 ms)."""
    yield from running_server(tmp_path_factory.mktemp("serve") / "server.log", "--replicas", "2",
                              "--cpus-per-replica", "0.5", "--max-batch-size", "8", "--batch-wait-ms", "100")


def post(url: str, path: str, payload, timeout: float = 120) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a POST; `payload` is JSON-encoded unless it is bytes already."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(entry: dict) -> np.ndarray:
    """A response mask as a boolean (H, W) array, from its COCO RLE."""
    height, width = entry["size"]
    return coco_mask.decode({"size": [height, width], "counts": entry["rle"].encode()}).astype(bool)


def shapes_base64(size=None) -> str:
    with Image.open(SHAPES) as image:
        return png_base64(image.convert("RGB").resize(size, Image.BILINEAR) if size else image)


def test_a_request_segments_the_red_circle_and_the_service_describes_itself(server):
    status, result, headers = post(server, "/v1/segment", {"image": shapes_base64(), "prompt": REQUEST})
    assert status == 200, result
    assert result["text"] == ANSWER
    (mask,) = result["masks"]
    assert mask["label"] == LABEL and mask["image"] == 0 and mask["size"] == [240, 320]
    assert iou(decode(mask), true_mask()) >= IOU_FLOOR
    assert set(result["timings"]) == {"prepare_ms", "queue_ms", "model_ms", "postprocess_ms", "total_ms"}
    assert headers["x-stamp-replica"] and headers["x-stamp-batch-size"] == "1"

    with urllib.request.urlopen(server + "/v1/model", timeout=30) as response:
        info = json.loads(response.read())
    assert (info["model_type"], info["backbone"]) == ("stamp", "qwen2_vl")
    assert (info["dtype"], info["device"]) == ("float32", "cpu")
    assert (info["min_placeholders"], info["max_placeholders"], info["context"]) == (144, 256, 4096)
    assert info["model"].endswith("demo_model")


def test_chat_answers_the_last_user_message_and_an_empty_mask_is_a_mask(server):
    image = shapes_base64()
    status, alone, _ = post(server, "/v1/chat", {"image": image, "messages": [{"role": "user", "content": REQUEST}]})
    assert status == 200, alone
    _, segmented, _ = post(server, "/v1/segment", {"image": image, "prompt": REQUEST})
    assert (alone["text"], alone["masks"]) == (segmented["text"], segmented["masks"])  # one path, one answer

    messages = [{"role": "user", "content": "Is the star big or small?"},
                {"role": "assistant", "content": "It is small."}, {"role": "user", "content": REQUEST}]
    status, follow_up, _ = post(server, "/v1/chat", {"image": image, "messages": messages})
    assert status == 200 and follow_up["text"] == ANSWER, follow_up
    (mask,) = follow_up["masks"]  # a new request after a question about another shape: the red circle's mask
    assert mask["size"] == [240, 320] and iou(decode(mask), true_mask()) >= IOU_FLOOR


def test_threshold_is_per_request_within_one_batch(server):
    image = shapes_base64()
    payloads = [{"image": image, "prompt": REQUEST, "threshold": t} for t in (-1e4, 0.0, 1e4)]
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda p: post(server, "/v1/segment", p), payloads))
    areas = [int(decode(result["masks"][0]).sum()) for _, result, _ in answers]
    assert areas[0] == 240 * 320 and 0 < areas[1] < 240 * 320 and areas[2] == 0, areas
    assert {result["text"] for _, result, _ in answers} == {ANSWER}


def test_concurrent_requests_get_the_answers_they_get_alone_from_both_replicas(server):
    """16 requests (4 prompts x 4 image sizes, two max_new_tokens settings) from 8 client threads: each gets exactly
    the text and masks it gets alone, though the replicas answered them in left-padded batches."""
    images = {size: shapes_base64(size) for size in SIZES}
    payloads = [{"image": images[size], "prompt": prompt, "max_new_tokens": 64 if k % 3 else 4}
                for k, (size, prompt) in enumerate((size, prompt) for size in SIZES for prompt in PROMPTS)]
    alone = [post(server, "/v1/segment", payload) for payload in payloads]
    assert all(status == 200 for status, _, _ in alone) and all(h["x-stamp-batch-size"] == "1" for _, _, h in alone)

    health = []

    def check_health():  # answered while batches run: model calls run off the replica's event loop
        time.sleep(1.0)
        start = time.perf_counter()
        with urllib.request.urlopen(server + "/healthz", timeout=30) as response:
            health.append((response.status, time.perf_counter() - start))

    with ThreadPoolExecutor(9) as pool:
        probe = pool.submit(check_health)
        together = list(pool.map(lambda payload: post(server, "/v1/segment", payload), payloads))
        probe.result()
    for (_, want, _), (status, got, _) in zip(alone, together):
        assert status == 200, got
        assert got["text"] == want["text"]
        assert [(m["label"], m["image"], m["size"], m["rle"]) for m in got["masks"]] == \
            [(m["label"], m["image"], m["size"], m["rle"]) for m in want["masks"]]
        # scores (rounded to 6 decimals by the service) to 1e-5, as in the thread-safety tests: a left-padded batch
        # sums in another order, and a score on a rounding boundary may then differ in its last printed digit
        assert [m["score"] for m in got["masks"]] == pytest.approx([m["score"] for m in want["masks"]], abs=1e-5)
    batch_sizes = [int(headers["x-stamp-batch-size"]) for _, _, headers in together]
    assert max(batch_sizes) > 1, batch_sizes  # they were batched
    replicas = {headers["x-stamp-replica"] for _, _, headers in alone + together}
    assert len(replicas) == 2, replicas  # --replicas 2: both answered
    assert health[0][0] == 200 and health[0][1] < 5.0, health


def bad_requests(tmp_path):
    """(path, body, status, message) for each kind of bad request."""
    def png(width, height):
        return png_base64(Image.new("RGB", (width, height), (200, 200, 200)))

    image = shapes_base64()
    segment = {"image": image, "prompt": REQUEST}
    chat = {"image": image, "messages": [{"role": "user", "content": REQUEST}]}
    return [
        ("/v1/segment", {"prompt": REQUEST}, 400, "no image"),
        ("/v1/segment", {**segment, "image": base64.b64encode(b"a,b\n1,2\n").decode()}, 400,
         "is not a PNG, JPEG or WebP image"),
        ("/v1/segment", {**segment, "image": str(SHAPES)}, 400, "paths and URLs are not read"),
        ("/v1/segment", {**segment, "image": "https://example.com/cat.png"}, 400, "paths and URLs are not read"),
        ("/v1/segment", {**segment, "image": "not base64!"}, 400, "image is not base64"),
        ("/v1/segment", {**segment, "image": png(1000, 3)}, 400, "1000x3 px is too thin (aspect ratio over 200)"),
        ("/v1/segment", {**segment, "image": png(4097, 4097)}, 400, "4097x4097 px, over the limit of 16.8 megapixels"),
        ("/v1/segment", {**segment, "prompt": "segment " * 5000}, 400, "over the model's context of 4096 tokens"),
        ("/v1/segment", {**segment, "prompt": "x" * (MAX_TEXT_BYTES + 1)}, 400,
         f"the text is {MAX_TEXT_BYTES + 1} bytes, over the limit of {MAX_TEXT_BYTES} bytes"),
        ("/v1/segment", {**segment, "prompt": "  "}, 400, "prompt is empty"),
        ("/v1/segment", b'{"image": "abc", "prompt": ', 400, "the body is not JSON"),
        ("/v1/segment", b"[1, 2]", 400, "the body must be a JSON object"),
        ("/v1/segment", {**segment, "path": "/etc/passwd"}, 400, "unknown field 'path'"),
        ("/v1/segment", {**segment, "prompt": 42}, 400, "prompt must be a string"),
        ("/v1/segment", {**segment, "image": 42}, 400, "image must be a string"),
        ("/v1/segment", {**segment, "threshold": "high"}, 400, "threshold must be a finite number"),
        ("/v1/segment", {**segment, "max_new_tokens": 0}, 400, "max_new_tokens must be an integer from 1 to"),
        ("/v1/segment", {**segment, "max_new_tokens": True}, 400, "max_new_tokens must be an integer from 1 to"),
        ("/v1/chat", {**chat, "messages": [{"role": "user", "content": [{"type": "image", "path": str(SHAPES)}]}]},
         400, "messages[0].content must be a string"),
        ("/v1/chat", {**chat, "messages": [{"role": "system", "content": "hi"}]}, 400, "messages[0].role must be"),
        ("/v1/chat", {**chat, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
         400, "a chat starts with a user message"),
        ("/v1/chat", {**chat, "messages": []}, 400, "messages must be a non-empty list"),
        ("/v1/chat", segment, 400, "unknown field 'prompt'"),
    ]


def test_bad_requests_get_their_status_and_one_line_then_the_service_keeps_serving(server, tmp_path):
    for path, payload, status, message in bad_requests(tmp_path):
        got, result, _ = post(server, path, payload)
        assert (got, list(result)) == (status, ["error"]), (message, got, result)
        assert message in result["error"] and "\n" not in result["error"], (message, result)
    status, result, _ = post(server, "/v1/segment", {"image": shapes_base64(), "prompt": REQUEST})
    assert status == 200 and result["text"] == ANSWER and len(result["masks"]) == 1


def test_a_body_over_the_size_limit_gets_413_before_it_is_read(server):
    """The service answers from the Content-Length, so the client may stop sending (the connection then closes)."""
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", "/v1/segment")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    connection.endheaders(b"x" * 2**16)
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read()) == {"error": f"the body is {MAX_BODY_BYTES + 1} bytes, over the limit of "
                                                    f"{MAX_BODY_BYTES} bytes"}
    connection.close()
    status, result, _ = post(server, "/v1/segment", {"image": shapes_base64(), "prompt": REQUEST})
    assert status == 200 and result["text"] == ANSWER


def test_serve_command_without_ray_says_how_to_install_it():
    result = without_module("ray", ["serve", "--port", "1"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("stamp-hf serve: error: stamp-hf serve needs Ray Serve")
    assert 'pip install -e ".[serve]"' in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def qwen3_server(tmp_path_factory):
    """`stamp-hf serve` on a tiny random Qwen3-VL STAMP (DeepStack placeholders on) that answers " it is <|seg|>"."""
    from stamp_hf.testing import answer_with_masks, tiny_stamp

    folder = tmp_path_factory.mktemp("qwen3")
    model, processor = tiny_stamp(seed=0, backbone="qwen3_vl")
    answer_with_masks(model, processor)
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    yield from running_server(folder / "server.log", "--model", str(folder / "model"), "--max-batch-size", "8",
                              "--batch-wait-ms", "100")


def test_a_qwen3_vl_stamp_serves_concurrent_requests_exactly_as_alone(qwen3_server):
    """The server on the Qwen3-VL backbone: concurrent, batched requests of different image sizes get exactly the
    answers and masks of the same requests sent alone."""
    with urllib.request.urlopen(qwen3_server + "/v1/model", timeout=30) as response:
        assert json.loads(response.read())["backbone"] == "qwen3_vl"
    jobs = [{"image": shapes_base64(size), "prompt": prompt} for size in SIZES for prompt in PROMPTS[:2]]
    alone = [post(qwen3_server, "/v1/segment", job) for job in jobs]
    assert all(status == 200 and len(result["masks"]) == 1 for status, result, _ in alone), alone[0]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda job: post(qwen3_server, "/v1/segment", job), jobs))
    assert max(int(headers["x-stamp-batch-size"]) for _, _, headers in together) > 1  # batches were formed
    for (_, one, _), (_, batched, _) in zip(alone, together, strict=True):
        assert (batched["text"], batched["masks"]) == (one["text"], one["masks"])
