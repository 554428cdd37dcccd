"""The STAMP HTTP service on Ray Serve: one deployment (FastAPI ingress) whose replicas each hold a model and batch
concurrent requests dynamically (`@serve.batch`) into the pipeline's own left-padded batches.

    app = application(options, replicas=2, max_batch_size=8, batch_wait_s=0.01)
    serve.run(app, name=APP_NAME)

`stamp-hf serve` builds and runs it. The API (JSON in and out):
  POST /v1/segment  {"image": base64, "prompt": str, "threshold"?: float, "max_new_tokens"?: int}
  POST /v1/chat     {"image": base64, "messages": [{"role": "user" | "assistant", "content": str}, ...], ...}
                    -> {"text", "masks": [{"label", "score", "image", "size": [H, W], "rle"}], "timings": {..._ms}}
  GET  /healthz, GET /v1/model
A bad request gets HTTP 400 (413 for a body over MAX_BODY_BYTES) with {"error": "<one line>"}. Requests carry
data only: the image is base64 bytes (paths and URLs are refused), chat contents are strings.

Each request runs the pipeline's steps: `preprocess` (the image through `load_image`, the chat template) off the event
loop, then a batch of requests with the same generation settings goes through the pipeline's `run_batch` (collate,
one model call at a time per replica, MAX_CONCURRENT_BATCHES, and the processor's post-processing, each request with
its own threshold).
"""

import asyncio
import base64
import binascii
import io
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from ray import serve
from starlette.exceptions import HTTPException

from .masks_json import mask_json  # noqa: F401  (also serve.mask_json, as the tests and tools call it)
from .processing_stamp import user_turn
from .serve_limits import IMAGE_FORMATS, MAX_BODY_BYTES, MAX_IMAGE_PIXELS, MAX_MESSAGES, MAX_NEW_TOKENS, MAX_TEXT_BYTES

APP_NAME = "stamp"
# Model calls (batches) one replica runs at once. Calls on the one model are safe together (README, "One model, many
# callers"), but a batch already runs its requests together: one at a time lets the next batch fill while it runs.
MAX_CONCURRENT_BATCHES = 1

SEGMENT_FIELDS = ("image", "prompt", "threshold", "max_new_tokens")
CHAT_FIELDS = ("image", "messages", "threshold", "max_new_tokens")
ROLES = ("user", "assistant")


class BadRequest(ValueError):
    """What the client got wrong, answered with `status` and {"error": message}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One parsed request on its way through the pipeline's steps."""

    image: bytes
    prompt: str | None = None  # /v1/segment
    messages: list | None = None  # /v1/chat: [{"role", "content": str}], the image goes with the first user turn
    threshold: float | None = None
    max_new_tokens: int | None = None
    sample: dict | None = None  # pipeline.preprocess output
    queued: float = 0.0  # perf_counter when it was handed to the batcher


# ---------------------------------------------------------------------- requests


def parse_request(body: bytes, fields: tuple[str, ...]) -> Job:
    """A /v1/segment (fields SEGMENT_FIELDS) or /v1/chat (CHAT_FIELDS) body as a Job; BadRequest names the problem."""
    try:
        data = json.loads(body)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise BadRequest(f"the body is not JSON ({_one_line(error)})") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the body must be a JSON object with {', '.join(fields)}; got a JSON {type(data).__name__}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; the fields are {', '.join(fields)}")
    job = Job(image=decode_image(data.get("image")))
    if "prompt" in fields:
        job.prompt = _text(data.get("prompt"), "prompt")
        text_bytes = len(job.prompt.encode())
    else:
        job.messages = _messages(data.get("messages"))
        text_bytes = sum(len(m["content"].encode()) for m in job.messages)
    if text_bytes > MAX_TEXT_BYTES:
        raise BadRequest(f"the text is {text_bytes} bytes, over the limit of {MAX_TEXT_BYTES} bytes")
    threshold = data.get("threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise BadRequest(f"threshold must be a finite number (a logit, 0.0 = probability 0.5), got {threshold!r}")
        job.threshold = float(threshold)
    tokens = data.get("max_new_tokens")
    if tokens is not None:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= MAX_NEW_TOKENS:
            raise BadRequest(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS}, got {tokens!r}")
        job.max_new_tokens = tokens
    return job


def decode_image(value) -> bytes:
    """The image file's bytes from its base64 text (a data: URL's base64 part too). Paths and URLs are refused: the
    service reads no files and fetches nothing. Only the header is read here, to refuse formats other than
    IMAGE_FORMATS and images over MAX_IMAGE_PIXELS before their pixels are decoded."""
    if value is None:
        raise BadRequest("no image: give 'image', a PNG, JPEG or WebP file base64-encoded")
    if not isinstance(value, str):
        raise BadRequest(f"image must be a string (the file base64-encoded), got a JSON {type(value).__name__}")
    if value.startswith("data:") and ";base64," in value[:100]:
        value = value.split(",", 1)[1]
    if any(character in value for character in ":.~\\"):  # never in base64; always in a URL, nearly always in a path
        raise BadRequest("image must be the file's bytes base64-encoded; paths and URLs are not read")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not base64 (give the file's bytes base64-encoded; paths and URLs are not read)") \
            from None
    if not data:
        raise BadRequest("no image: 'image' is empty")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as header:
            width, height = header.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
        raise BadRequest(f"the image data ({len(data)} bytes) is not a PNG, JPEG or WebP image") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise BadRequest(f"the image is {width}x{height} px, over the limit of {MAX_IMAGE_PIXELS / 1e6:.1f} megapixels")
    return data


def _text(value, name: str) -> str:
    if value is None:
        raise BadRequest(f"no {name}: give {name!r}, a string")
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, got a JSON {type(value).__name__}")
    if not value.strip():
        raise BadRequest(f"{name} is empty")
    return value


def _messages(value) -> list[dict]:
    if value is None:
        raise BadRequest("no messages: give 'messages', a list of {\"role\", \"content\"}")
    if not isinstance(value, list) or not value:
        raise BadRequest("messages must be a non-empty list of {\"role\", \"content\"}")
    if len(value) > MAX_MESSAGES:
        raise BadRequest(f"{len(value)} messages, over the limit of {MAX_MESSAGES}")
    messages = []
    for k, message in enumerate(value):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise BadRequest(f"messages[{k}] must be an object with exactly 'role' and 'content'")
        if message["role"] not in ROLES:
            raise BadRequest(f"messages[{k}].role must be 'user' or 'assistant', got {message['role']!r}")
        messages.append({"role": message["role"], "content": _text(message["content"], f"messages[{k}].content")})
    if messages[0]["role"] != "user" or messages[-1]["role"] != "user":
        raise BadRequest("a chat starts with a user message (it gets the image) and ends with the one to answer")
    return messages


def pipeline_input(job: Job) -> dict:
    """What `STAMPSegmentationPipeline.preprocess` takes: the image bytes go through `load_image` there."""
    if job.prompt is not None:
        return {"image": job.image, "prompt": job.prompt}
    first, *rest = job.messages
    return {"messages": [user_turn([job.image], first["content"]), *rest]}


# ---------------------------------------------------------------------- responses


def error_response(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 past MAX_BODY_BYTES (by its Content-Length, or while it streams in)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise BadRequest(f"the body is {int(length)} bytes, over the limit of {MAX_BODY_BYTES} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadRequest(f"the body is over the limit of {MAX_BODY_BYTES} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------- the deployment

api = FastAPI(title="STAMP segmentation service")


@api.exception_handler(HTTPException)
async def _http_error(request, error: HTTPException):  # unknown paths, wrong methods: {"error"} like every refusal
    return error_response(str(error.detail), error.status_code)


@serve.deployment
@serve.ingress(api)
class STAMPService:
    """One replica: the model, the pipeline, the batcher. `options`: the parsed `stamp-hf serve` arguments (model,
    device, dtype, allow_pickle, max_new_tokens, max_batch_size, batch_wait_ms, threads)."""

    def __init__(self, options):
        import torch
        from transformers import pipeline

        from .commands._common import load
        from .configuration_stamp import STAMP_CONFIGS
        from .pipeline_stamp import PIPELINE_TASK

        torch.set_num_threads(options.threads)
        self.model, self.processor, _ = load(options)
        self.pipe = pipeline(PIPELINE_TASK, model=self.model, processor=self.processor, device=self.model.device)
        self.max_new_tokens = options.max_new_tokens
        self.answer_batch.set_max_batch_size(options.max_batch_size)
        self.answer_batch.set_batch_wait_timeout_s(options.batch_wait_ms / 1000)
        self.model_calls = ThreadPoolExecutor(MAX_CONCURRENT_BATCHES, thread_name_prefix="stamp-model")
        self.steps = ThreadPoolExecutor(1, thread_name_prefix="stamp-steps")  # decoding, tokenizing, post-processing
        context = serve.get_replica_context()
        self.replica = f"{context.replica_id.unique_id}:{os.getpid()}"
        config = self.model.config
        backbone = {c.model_type: name for name, c in STAMP_CONFIGS.items()}.get(config.model_type, config.model_type)
        self.info = {
            "model": options.model, "model_type": config.model_type, "backbone": backbone,
            "min_placeholders": self.processor.min_placeholders, "max_placeholders": self.processor.max_placeholders,
            "context": config.text_config.max_position_embeddings, "dtype": str(self.model.dtype).replace("torch.", ""),
            "device": str(self.model.device), "max_batch_size": options.max_batch_size,
            "batch_wait_ms": options.batch_wait_ms, "max_new_tokens": self.max_new_tokens,
            "limits": {"body_bytes": MAX_BODY_BYTES, "text_bytes": MAX_TEXT_BYTES, "messages": MAX_MESSAGES,
                       "image_pixels": MAX_IMAGE_PIXELS, "max_new_tokens": MAX_NEW_TOKENS},
        }

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "replica": self.replica}

    @api.get("/v1/model")
    async def model_info(self):
        return {**self.info, "replica": self.replica}

    @api.post("/v1/segment")
    async def segment(self, request: Request):
        return await self.answer(request, SEGMENT_FIELDS)

    @api.post("/v1/chat")
    async def chat(self, request: Request):
        return await self.answer(request, CHAT_FIELDS)

    async def answer(self, request: Request, fields: tuple[str, ...]):
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            body = await read_body(request)
            job = await loop.run_in_executor(self.steps, self.prepare, body, fields)
            prepared = time.perf_counter()
            job.queued = prepared
            answer, batch = await self.answer_batch(job)
            if isinstance(answer, Exception):
                raise BadRequest(f"the model cannot answer this: {_one_line(answer)}")
            answered = time.perf_counter()
            result = await loop.run_in_executor(self.steps, self.respond, job, answer)
        except BadRequest as error:
            return error_response(str(error), error.status)
        except Exception as error:  # a failure of ours: still one line, and the replica keeps serving
            return error_response(f"internal error: {type(error).__name__}: {_one_line(error)}", 500)
        done = time.perf_counter()
        result["timings"] = {"prepare_ms": _ms(prepared - start), "queue_ms": _ms(batch["started"] - prepared),
                             "model_ms": _ms(batch["seconds"]), "postprocess_ms": _ms(done - answered),
                             "total_ms": _ms(done - start)}
        headers = {"X-Stamp-Replica": self.replica, "X-Stamp-Batch-Size": str(batch["size"])}
        return JSONResponse(result, headers=headers)

    def prepare(self, body: bytes, fields) -> Job:
        """Parse, decode the image and tokenize (the pipeline's preprocess); the model's own input checks (the
        context) run here, per request, so that a bad request never fails a batch."""
        job = parse_request(body, fields)
        if job.max_new_tokens is None:
            job.max_new_tokens = self.max_new_tokens
        try:
            job.sample = self.pipe.preprocess(pipeline_input(job))
            inputs = job.sample["inputs"]
            self.model.check_generation_inputs(
                inputs["input_ids"], inputs["attention_mask"], inputs.get("mm_token_type_ids"),
                inputs.get("pixel_values"), inputs.get("image_grid_thw"), None)
        except (ValueError, TypeError, OSError) as error:
            raise BadRequest(_one_line(error)) from None
        return job

    def respond(self, job: Job, result: dict) -> dict:
        """A pipeline result as JSON."""
        return {"text": result["text"], "masks": [mask_json(entry) for entry in result["masks"]]}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def answer_batch(self, jobs: list[Job]) -> list[tuple]:
        """(the pipeline's result, or the exception of a request the model refused; {"size", "started", "seconds"}
        of its model call) per job. Jobs whose generation settings differ run as separate groups."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.model_calls, self.generate, jobs)

    def generate(self, jobs: list[Job]) -> list[tuple]:
        groups: dict[int, list[int]] = {}
        for k, job in enumerate(jobs):
            groups.setdefault(job.max_new_tokens, []).append(k)
        results = [None] * len(jobs)
        for max_new_tokens, members in groups.items():
            started = time.perf_counter()
            answers = self.run([jobs[k] for k in members], max_new_tokens)
            batch = {"size": len(members), "started": started, "seconds": time.perf_counter() - started}
            for k, answer in zip(members, answers):
                results[k] = (answer, batch)
        return results

    def run(self, jobs: list[Job], max_new_tokens: int) -> list:
        """The pipeline on one left-padded batch (its collate, forward and post-processing, each request with its own
        threshold); if the batch fails, each request alone, so that only the request at fault gets the error."""
        default = self.model.config.mask_threshold
        thresholds = [default if job.threshold is None else job.threshold for job in jobs]
        try:
            return self.pipe.run_batch([job.sample for job in jobs], {"max_new_tokens": max_new_tokens},
                                       {"threshold": thresholds})
        except (ValueError, TypeError, RuntimeError) as error:
            if len(jobs) == 1:
                return [error]
            return [self.run([job], max_new_tokens)[0] for job in jobs]


def application(options, replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0):
    """The bound deployment for `serve.run`: `replicas` replicas, each reserving num_cpus / num_gpus in Ray and
    accepting enough requests at once to fill a batch while another runs (and answer health checks)."""
    ongoing = 2 * options.max_batch_size * MAX_CONCURRENT_BATCHES + 8
    return STAMPService.options(
        num_replicas=replicas, max_ongoing_requests=ongoing,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
    ).bind(options)


__all__ = [
    "APP_NAME",
    "CHAT_FIELDS",
    "IMAGE_FORMATS",
    "MAX_BODY_BYTES",
    "MAX_CONCURRENT_BATCHES",
    "MAX_IMAGE_PIXELS",
    "MAX_MESSAGES",
    "MAX_NEW_TOKENS",
    "MAX_TEXT_BYTES",
    "SEGMENT_FIELDS",
    "BadRequest",
    "STAMPService",
    "application",
    "decode_image",
    "mask_json",
    "parse_request",
]
