"""STAMPProcessor: Qwen2-VL image processor + tokenizer + chat template, and mask post-processing.

Hub remote code: imports only torch, transformers, PIL, numpy and the other `*_stamp.py` files.
"""

import copy
import io
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_utils import SizeDict
from transformers.image_utils import load_image as transformers_load_image
from transformers.processing_utils import ProcessorMixin
from transformers.utils.chat_template_utils import encode_marked_chat, mark_control_tokens

from .sam_stamp import SAM_PROTOCOLS

# How a patch grid becomes a mask at the image's size (`post_process_masks`):
#   "nearest": the official STAMP procedure: threshold the grid, then upsample the 0/1 grid with PyTorch's legacy
#              nearest interpolation (what the released checkpoints were evaluated with);
#   "bilinear": upsample the logits bilinearly, then threshold (what mask_loss_resolution="image" trains for).
MASK_RESAMPLES = ("nearest", "bilinear")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
MAX_ASPECT_RATIO = 200  # Qwen2-VL's resize refuses images whose long side exceeds 200 times the short side

# The Qwen2-VL-Instruct chat template (images become <|vision_start|><|image_pad|><|vision_end|>).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class STAMPProcessor(ProcessorMixin):
    r"""
    Turns images and conversations into Qwen2-VL inputs, and STAMP's patch logits into masks.

    The image is resized (aspect kept, sides multiples of patch_size * merge_size) so that its number of merged
    patches N lies in [min_placeholders, max_placeholders]: N is both the number of `<|image_pad|>` tokens and the
    number of mask placeholders per `<|seg|>`.

    `apply_chat_template` encodes control tokens typed in the messages (`<|seg|>`, `<|image_pad|>`, ...) as plain text
    by default (`sanitize_control_tokens=True`), so user text can never trigger a mask or forge an image slot.

    Saved with it: `mask_resample` (how `post_process_masks` upsamples, MASK_RESAMPLES) and `sam_protocol` (how SAM
    refinement prompts SAM, sam_stamp.SAM_PROTOCOLS: "official" for converted released checkpoints, "stamp" else).
    """

    return_mm_token_type_ids = True

    def __init__(
        self, image_processor=None, tokenizer=None, chat_template=None, min_placeholders=1024, max_placeholders=1280,
        mask_resample="nearest", sam_protocol="stamp", **kwargs
    ):
        if not 0 < min_placeholders <= max_placeholders:
            raise ValueError(
                f"need 0 < min_placeholders <= max_placeholders, got {min_placeholders} and {max_placeholders}"
            )
        self.min_placeholders = min_placeholders
        self.max_placeholders = max_placeholders
        self.mask_resample = _check_resample(mask_resample)
        if sam_protocol not in SAM_PROTOCOLS:
            raise ValueError(f"SAM protocol must be one of {SAM_PROTOCOLS}, got {sam_protocol!r}")
        self.sam_protocol = sam_protocol
        self.image_token = "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if image_processor is not None:
            image_processor = copy.deepcopy(image_processor)  # the caller's object keeps its own size
            pixels_per_patch = self.patch_factor(image_processor) ** 2
            image_processor.size = SizeDict(
                shortest_edge=min_placeholders * pixels_per_patch, longest_edge=max_placeholders * pixels_per_patch
            )
        if chat_template is None:
            chat_template = QWEN2_VL_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @staticmethod
    def patch_factor(image_processor) -> int:
        """Side in pixels of one merged patch (28 for Qwen2-VL: 14 px patches merged 2x2)."""
        return image_processor.patch_size * image_processor.merge_size

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_placeholders(image_inputs["image_grid_thw"][image_idx])

    def num_placeholders(self, grid_thw) -> int:
        """N: merged patches of one image = mask placeholders per `<|seg|>`, from its (t, h, w) patch grid."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.image_processor.merge_size**2

    def mask_grid(self, grid_thw) -> tuple[int, int]:
        """(rows, cols) of the merged patch grid on which STAMP predicts a mask."""
        merge = self.image_processor.merge_size
        return int(grid_thw[1]) // merge, int(grid_thw[2]) // merge

    def apply_chat_template(self, conversation, chat_template=None, sanitize_control_tokens=True, **kwargs):
        """Render and (by default) tokenize a conversation; typed control tokens stay text unless told otherwise."""
        if not kwargs.get("tokenize", True):
            sanitize_control_tokens = False  # marking only applies when we tokenize
        return super().apply_chat_template(
            conversation, chat_template=chat_template, sanitize_control_tokens=sanitize_control_tokens, **kwargs
        )

    def encode_chat(self, messages: list[dict], timeout=None, labels: bool = False):
        """
        The one way a chat becomes model inputs, for inference and training: every image of the chat loaded by
        `load_image`, the chat template rendered, then the processor's own call (each image slot expanded to its N
        placeholders, the text tokenized) with the control tokens typed in the messages encoded as plain text, so text
        can never trigger a mask or forge an image slot.

        User and system text is sanitized; assistant text is the model's own (or a teacher-forced answer), so its
        `<|seg|>` is the token, in inference as in training. Inference (default): the chat so far plus the generation
        prompt. Training (`labels=True`): the whole chat and `labels`: the ids of every assistant turn and its
        end-of-turn tokens, IGNORE_INDEX elsewhere.

        Returns (inputs of batch 1, the loaded images in order).
        """
        messages, images = load_chat_images(messages, timeout)
        control_tokens = _control_tokens_re(self.tokenizer)
        marked = [{**m, "content": m["content"] if m["role"] == "assistant"
                   else mark_control_tokens(m["content"], control_tokens)} for m in messages]
        text = self.apply_chat_template(marked, tokenize=False, add_generation_prompt=not labels)
        inputs = self(text=text, images=images or None, sanitize_control_tokens=True, return_tensors="pt")
        if labels:
            inputs["labels"] = torch.tensor([self._assistant_labels(marked, inputs)])
        return inputs, images

    def _assistant_labels(self, marked: list[dict], inputs) -> list[int]:
        """The labels of `encode_chat(labels=True)`. Each assistant turn spans from the end of the generation prompt
        before it to the end of its own rendering (end-of-turn tokens included): spans measured on renderings of the
        chat's prefixes (any chat template works, with or without `{% generation %}` markers), before image slots are
        expanded, then shifted by the placeholders of the slots before them."""
        input_ids = inputs["input_ids"][0].tolist()
        extra = [self.num_placeholders(grid) - 1 for grid in inputs.get("image_grid_thw", [])]

        def encode(turns, add_generation_prompt=False) -> list[int]:
            text = self.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)
            return encode_marked_chat(self.tokenizer, text)

        whole = encode(marked)

        def expanded_length(turns, add_generation_prompt) -> int:
            ids = encode(turns, add_generation_prompt)
            if whole[: len(ids)] != ids:
                raise ValueError("the chat template does not render a conversation as the sum of its turns")
            return len(ids) + sum(extra[: ids.count(self.image_token_id)])

        labels = [IGNORE_INDEX] * len(input_ids)
        for k, message in enumerate(marked):
            if message["role"] == "assistant":
                start, end = expanded_length(marked[:k], True), expanded_length(marked[: k + 1], False)
                labels[start:end] = input_ids[start:end]
        return labels

    def post_process_generation(self, outputs, prompt_lengths, target_sizes, threshold=0.0, resample=None,
                                stop_ids=None) -> list[dict]:
        """
        The one post-processing of `generate_with_masks`: per sample, {"text", "masks"}: the response up to its first
        stop token (its `<|seg|>` tokens kept), and one {"label", "score", "image", "mask"} per `<|seg|>`.

        Args:
            outputs: what `generate_with_masks` returns (sequences, seg_positions, seg_images, mask_logits).
            prompt_lengths: where each row's response starts in `sequences` (one int for a left-padded batch).
            target_sizes: per row, the (height, width) of each of its images (or one (height, width) for a row with
                one image): the sizes of the images before the processor resized them.
            threshold: a patch (pixel) is foreground where its logit exceeds it (the model's config.mask_threshold);
                one value, or one per row.
            resample: "nearest" / "bilinear" (see `post_process_masks`); default `self.mask_resample`.
            stop_ids: ids that end a response (the model's generation_config.eos_token_id; default the tokenizer's
                end-of-sequence token); padding after a batch row ended ends it too.

        "mask" is a boolean numpy array at its image's size; "image" the index among the row's images of the image the
        `<|seg|>` masks; "score" the mean foreground probability of its foreground patches (0.0 for an empty mask);
        "label" the response text since the previous `<|seg|>`.
        """
        resample = _check_resample(self.mask_resample if resample is None else resample)
        rows = len(outputs.sequences)
        prompt_lengths = [prompt_lengths] * rows if isinstance(prompt_lengths, int) else list(prompt_lengths)
        thresholds = list(threshold) if isinstance(threshold, (list, tuple)) else [threshold] * rows
        stops = set(_as_list(self.tokenizer.eos_token_id if stop_ids is None else stop_ids))
        stops.add(self.tokenizer.pad_token_id)
        results = []
        for row in range(rows):
            start = prompt_lengths[row]
            response = outputs.sequences[row][start:].tolist()
            sizes = target_sizes[row]
            sizes = [sizes] if isinstance(sizes[0], int) else sizes
            masks, previous = [], 0
            pieces = zip(outputs.seg_positions[row], outputs.mask_logits[row], outputs.seg_images[row])
            for index, logits, image in pieces:
                offset = index - start
                label = self.tokenizer.decode(response[previous:offset], skip_special_tokens=True).strip(" .,;:\n")
                previous = offset + 1
                mask = grid_to_mask(logits, sizes[image], thresholds[row], resample)
                foreground = logits.float().sigmoid()[logits > thresholds[row]]
                score = float(foreground.mean()) if foreground.numel() else 0.0
                masks.append({"label": label, "score": score, "image": image, "mask": mask.cpu().numpy()})
            end = next((i for i, token in enumerate(response) if token in stops), len(response))
            results.append({"text": self.tokenizer.decode(response[:end], skip_special_tokens=False), "masks": masks})
        return results

    def post_process_masks(self, mask_logits, target_sizes, threshold: float = 0.0, resample: str | None = None):
        """
        Masks at the original image sizes.

        Args:
            mask_logits: the `mask_logits` of `generate_with_masks` / `predict_masks` (a list per sample of (h, w)
                logit grids), or the generate output itself.
            target_sizes: one (height, width) per sample: the size of the image before the processor resized it.
            threshold: a patch (or pixel) is foreground where its logit exceeds it (0.0: the paper's logit > 0).
            resample: "nearest" (threshold the grid, then legacy nearest upsampling: the official procedure) or
                "bilinear" (upsample the logits, then threshold); default `self.mask_resample`.

        Returns:
            A list per sample of boolean (height, width) tensors, one per `<|seg|>`.
        """
        resample = _check_resample(self.mask_resample if resample is None else resample)
        mask_logits = getattr(mask_logits, "mask_logits", mask_logits)
        if len(mask_logits) != len(target_sizes):
            raise ValueError(f"got mask logits for {len(mask_logits)} samples but {len(target_sizes)} target sizes")
        return [
            [grid_to_mask(grid, (height, width), threshold, resample) for grid in sample_logits]
            for sample_logits, (height, width) in zip(mask_logits, target_sizes)
        ]

    @property
    def model_input_names(self):
        return super().model_input_names + ["mm_token_type_ids"]


def upsample_mask_logits(grid: torch.Tensor, size) -> torch.Tensor:
    """An (h, w) patch-logit grid as (height, width) = `size` pixel logits: the one upsampling of inference
    (post_process_masks) and of training at mask_loss_resolution="image".

    The processor resizes each side independently (height * s_h, width * s_w), and the patch grid tiles the resized
    image, so bilinear upsampling of the grid straight to (height, width), with cell centres at pixel-area centres
    (align_corners=False), is the exact inverse of that resize."""
    height, width = (int(v) for v in size)
    return F.interpolate(grid[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def grid_to_mask(grid: torch.Tensor, size, threshold: float = 0.0, resample: str = "nearest") -> torch.Tensor:
    """One (h, w) patch-logit grid as a boolean (height, width) = `size` mask, by `resample` (see MASK_RESAMPLES)."""
    if resample == "nearest":
        # the official line, float64 included: PyTorch's CPU kernel computes source indices in the input's precision,
        # and float32 picks other cells at some borders (5 of the 333 pixel rows of a 500x333 image at 1024-1280).
        # PyTorch's CUDA kernel computes them in float32 whatever the dtype, so on a GPU (where the official eval ran)
        # the grid, left on its device, goes through the same kernel as there.
        cells = (grid.float() > threshold).double()
        return F.interpolate(cells[None, None], size=tuple(int(v) for v in size), mode="nearest")[0, 0] > 0.5
    return upsample_mask_logits(grid, size) > threshold


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _check_resample(resample: str) -> str:
    if resample not in MASK_RESAMPLES:
        raise ValueError(f"mask resample must be one of {MASK_RESAMPLES}, got {resample!r}")
    return resample


def default_mask_resample(mask_loss_resolution: str) -> str:
    """The post-processing a model was trained for: "bilinear" when its loss scored the upsampled logits, else the
    official "nearest"."""
    return "bilinear" if mask_loss_resolution == "image" else "nearest"


# ------------------------------------------------------------------ the one image loader and message builder


def load_image(source, timeout=None, upright: bool = True) -> Image.Image:
    """
    Every image STAMP sees comes through here: a path, an http(s) URL, a PIL image, a numpy array or the bytes of an
    image file (PNG, JPEG, WebP, ...; what a server receives), as an upright
    (EXIF orientation applied) RGB PIL image. `upright=False` keeps the stored pixel orientation: dataset annotations
    (COCO, REFER, the training format) are drawn in it. 16-bit and 32-bit integer images are rescaled from their full range
    (65535 -> 255), float images from [0, 1] (or from their own min..max when outside it), transparent pixels are
    composited on white (ALPHA_BACKGROUND), animated images give their first frame. Problems (a missing file, not an
    image, an aspect ratio Qwen2-VL cannot resize) are a one-line ValueError / OSError naming the source.
    """
    if isinstance(source, Image.Image):
        return _checked(_to_rgb(source, upright), "the PIL image")
    if isinstance(source, np.ndarray):
        return _checked(_to_rgb(_array_image(source), upright), f"the {source.dtype} array of shape {source.shape}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = f"the image data ({len(source)} bytes)"
        return _checked(_open(io.BytesIO(source), name, upright), name)
    if isinstance(source, Path) or isinstance(source, str):
        source = str(source)
        if source.startswith(("http://", "https://")):
            return _checked(_to_rgb(_download(source, timeout), upright), source)
        return _checked(_read_file(source, upright), source)
    raise TypeError(f"an image must be a path, URL, PIL image, numpy array or bytes, got {type(source).__name__}")


def _read_file(path: str, upright: bool) -> Image.Image:
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not an image file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image file")
    return _open(path, path, upright)


def _open(file, name: str, upright: bool) -> Image.Image:
    """An image file (a path or a binary file object) decoded as upright RGB; `name` says what it is in errors."""
    try:
        with Image.open(file) as image:
            return _to_rgb(image, upright)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{name}: the image is too large ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        # PIL names a file object by its repr (a memory address): say what it means instead
        reason = "not a format PIL knows" if isinstance(error, UnidentifiedImageError) and not isinstance(file, str) \
            else " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{name}: cannot read it as an image ({reason})") from None


def _download(url: str, timeout=None) -> Image.Image:
    """The image at `url` (fetched by transformers' own loader); refused without touching the network when the Hub's
    offline mode is set."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        raise OSError(f"{url}: not downloaded, HF_HUB_OFFLINE is set; download the image and pass the file")
    try:
        return transformers_load_image(url, timeout=timeout)
    except (UnidentifiedImageError, ValueError) as error:
        raise ValueError(f"{url}: the download is not an image ({error})") from None
    except Exception as error:  # the HTTP client's own errors (connection, status, timeout)
        raise OSError(f"{url}: cannot download the image ({type(error).__name__}: {error})") from None


def _array_image(array: np.ndarray) -> Image.Image:
    """A numpy image ((H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA; uint8, 16-bit, bool or float) as PIL."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"a numpy image must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    mode = "L" if array.ndim == 2 else "RGB" if array.shape[2] == 3 else "RGBA"
    return Image.fromarray(array if array.dtype == np.uint8 else _to_uint8(array), mode)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Pixel values on 0..255 from their real range: bool 0/1; integers 0..65535 (16-bit, also in the 32-bit
    container PIL opens some 16-bit files in); floats 0..1; any other range from its own min..max."""
    if values.dtype == bool:
        return values.astype(np.uint8) * 255
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise ValueError(f"an image array must hold numbers, got {values.dtype}")
    full_range = 65535.0 if np.issubdtype(values.dtype, np.integer) else 1.0
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("the image holds NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if not (0.0 <= low and high <= full_range):
        values, full_range = values - low, (high - low) or 1.0
    return np.clip(np.round(values * (255.0 / full_range)), 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image, upright: bool = True) -> Image.Image:
    """The first frame as RGB, turned upright by its EXIF orientation if `upright`. The result carries no orientation
    metadata: its pixels are final, so loading it again (as `encode_chat` does with a loaded image) changes nothing."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    if upright:
        image = ImageOps.exif_transpose(image)
    rgb = _rgb_pixels(image)
    for key in ("exif", "xmp", "XML:com.adobe.xmp"):
        rgb.info.pop(key, None)
    return rgb


def _rgb_pixels(image: Image.Image) -> Image.Image:
    """Any PIL mode as a new RGB image: high bit depths rescaled (_to_uint8), transparency composited on white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image)), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode in ("RGB", "L") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _checked(image: Image.Image, name: str) -> Image.Image:
    width, height = image.size
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"{name}: {width}x{height} px is too thin (aspect ratio over {MAX_ASPECT_RATIO}), which Qwen2-VL cannot resize"
        )
    return image


def user_turn(images: list, text: str) -> dict:
    """The one message builder: a user turn with its images first, then its text (the layout STAMP learned)."""
    return {"role": "user", "content": [*({"type": "image", "image": image} for image in images),
                                        {"type": "text", "text": text}]}


def load_chat_images(messages: list[dict], timeout=None) -> tuple[list[dict], list[Image.Image]]:
    """The chat with every image entry loaded by `load_image`, and those images in order."""
    loaded, images = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            items = []
            for item in content:
                if item.get("type") == "image" or "image" in item:
                    source = next((item[k] for k in ("image", "url", "path") if k in item), None)
                    if source is None:
                        raise ValueError(f"an image entry of the chat has no 'image', 'url' or 'path': {item}")
                    images.append(load_image(source, timeout))
                    item = {"type": "image", "image": images[-1]}
                items.append(item)
            content = items
        loaded.append({**message, "content": content})
    return loaded, images


IGNORE_INDEX = -100  # label of a token the text loss skips


def _control_tokens_re(tokenizer) -> re.Pattern:
    """Every special token the tokenizer knows (the chat's control tokens and STAMP's)."""
    tokens = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens)) or "(?!)")


def left_padded_batch(processor, encoded: list[dict]) -> dict:
    """The one batching rule: single-sample processor outputs (batch 1 each) as one generation batch, token tensors
    left-padded (generation continues on the right), image patches and grids concatenated in order."""
    length = max(e["input_ids"].shape[1] for e in encoded)
    padding = {"input_ids": processor.tokenizer.pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0}
    batch = {}
    for key, value in padding.items():
        batch[key] = torch.cat([F.pad(e[key], (length - e[key].shape[1], 0), value=value) for e in encoded])
    for key in ("pixel_values", "image_grid_thw"):
        batch[key] = torch.cat([e[key] for e in encoded])
    return batch


__all__ = [
    "IGNORE_INDEX",
    "MASK_RESAMPLES",
    "QWEN2_VL_CHAT_TEMPLATE",
    "STAMPProcessor",
    "default_mask_resample",
    "grid_to_mask",
    "left_padded_batch",
    "load_chat_images",
    "load_image",
    "upsample_mask_logits",
    "user_turn",
]
