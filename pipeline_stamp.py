"""The "stamp-segmentation" pipeline: an image and a sentence (or a chat) in, the answer and one mask per `<|seg|>` out.

    pipe = pipeline("stamp-segmentation", model="org/stamp-2b", trust_remote_code=True)
    pipe("photo.jpg", "Please segment the cat.")
    # {"text": "Sure, it is <|seg|>.", "masks": [{"label": "Sure, it is", "score": 0.93, "mask": <PIL L image>}]}

Hub remote code: imports only torch, transformers, PIL, numpy and the other `*_stamp.py` files.
"""

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, GenerationConfig, Pipeline
from transformers.image_utils import load_image

from .sam_stamp import sam_refiner

PIPELINE_TASK = "stamp-segmentation"
DEFAULT_SAM_MODEL = "facebook/sam-vit-huge"  # the SAM the paper refines with


class STAMPSegmentationPipeline(Pipeline):
    """
    Inputs, alone or in a list (batched by `batch_size`):
      - `pipe(image, prompt)`: image = path, URL, PIL image or (H, W, 3) uint8 numpy array; prompt = the user's text;
      - `pipe(messages)`: a chat (list of {"role", "content"} messages; image entries as in transformers' chat format);
      - `pipe({"image": ..., "prompt": ...})` or `pipe({"messages": [...]})`.
    Images are turned upright from their EXIF orientation first; masks come at that upright size.

    Output per input: {"text": the response (with its `<|seg|>` tokens), "masks": one {"label", "score", "mask"} per
    `<|seg|>`}. "mask" is a PIL "L" image (0 / 255) the size of the image the `<|seg|>` refers to (the last one
    before it); "score" is the mean foreground probability of its foreground patches (0.0 for an empty mask);
    "label" is the response text between the previous `<|seg|>` and this one.

    Call parameters: any `generate` argument (max_new_tokens, do_sample, generation_config, ...); `threshold` (logit
    threshold, default config.mask_threshold); `refine=True` to refine each mask with SAM, `sam_model` (a Hub id or
    folder for transformers' SamModel, a .pth path for segment-anything, or a refiner object; default
    facebook/sam-vit-huge) and `seed` for the point sampling.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    @classmethod
    def custom_pipeline_entry(cls) -> dict:
        """What `config.custom_pipelines[PIPELINE_TASK]` holds so that `pipeline(..., trust_remote_code=True)` finds
        this class in the saved remote code."""
        return {"impl": f"{cls.__module__.split('.')[-1]}.{cls.__name__}", "pt": ["AutoModel"], "type": "multimodal"}

    def __call__(self, inputs, prompt=None, **kwargs):
        if prompt is not None:
            if isinstance(inputs, (list, tuple)):
                prompts = [prompt] * len(inputs) if isinstance(prompt, str) else list(prompt)
                if len(prompts) != len(inputs):
                    raise ValueError(f"got {len(inputs)} images but {len(prompts)} prompts")
                inputs = [{"image": image, "prompt": text} for image, text in zip(inputs, prompts)]
            else:
                inputs = {"image": inputs, "prompt": prompt}
        elif _is_chat(inputs):
            inputs = {"messages": list(inputs)}
        elif isinstance(inputs, (list, tuple)):
            inputs = [{"messages": list(item)} if _is_chat(item) else item for item in inputs]
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, timeout=None, threshold=None, refine=None, sam_model=None, seed=None,
                             generate_kwargs=None, **generate_params):
        preprocess = {} if timeout is None else {"timeout": timeout}
        forward = {**(generate_kwargs or {}), **generate_params}
        if forward.get("num_return_sequences", 1) != 1:
            raise ValueError("the pipeline returns one answer per input; use model.generate_with_masks for several")
        postprocess = {}
        if threshold is not None:
            postprocess["threshold"] = threshold
        if refine:
            postprocess["refiner"] = self._refiner(sam_model if sam_model is not None else DEFAULT_SAM_MODEL)
        if seed is not None:
            postprocess["seed"] = seed
        return preprocess, forward, postprocess

    def _refiner(self, source):
        """SAM refiners are loaded once per pipeline and source."""
        cache = self.__dict__.setdefault("_sam_refiners", {})
        key = source if isinstance(source, str) else id(source)
        if key not in cache:
            cache[key] = sam_refiner(source)
        return cache[key]

    # ------------------------------------------------------------------ preprocess / forward / postprocess

    def preprocess(self, inputs, timeout=None):
        if not isinstance(inputs, dict) or not ({"messages"} <= inputs.keys() or {"image", "prompt"} <= inputs.keys()):
            raise ValueError(
                "give an image and a prompt, a chat (list of messages), or a dict with 'image' and 'prompt' or "
                f"'messages'; got {type(inputs).__name__}"
            )
        if "messages" in inputs:
            messages = inputs["messages"]
        else:
            content = [{"type": "image", "image": inputs["image"]}, {"type": "text", "text": inputs["prompt"]}]
            messages = [{"role": "user", "content": content}]
        messages, images = _load_chat_images(messages, timeout)
        if not images:
            raise ValueError("STAMP segments images: the input holds no image")
        encoded = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        return {"inputs": dict(encoded), "images": [images]}

    def _collate(self, samples: list[dict]) -> dict:
        batch = left_padded_batch(self.processor, [s["inputs"] for s in samples])
        return {"inputs": batch, "images": [images for s in samples for images in s["images"]]}

    def _forward(self, model_inputs, **generate_kwargs):
        inputs = model_inputs["inputs"]
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        out = self.model.generate_with_masks(**inputs, **generate_kwargs)
        return split_by_sample(self.model, out, inputs["input_ids"].shape[1], model_inputs["images"])

    def postprocess(self, sample, threshold=None, refiner=None, seed=0):
        return segmentation_result(self.model, self.processor, sample, threshold, refiner, seed)

    # ------------------------------------------------------------------ batching: our collate, one output per input

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        def results():
            batch = []
            for item in inputs:
                batch.append(self.preprocess(item, **preprocess_params))
                if len(batch) == batch_size:
                    yield from self._run_batch(batch, forward_params, postprocess_params)
                    batch = []
            if batch:
                yield from self._run_batch(batch, forward_params, postprocess_params)

        return results()

    def run_single(self, inputs, preprocess_params, forward_params, postprocess_params):
        return next(iter(self._run_batch([self.preprocess(inputs, **preprocess_params)], forward_params,
                                         postprocess_params)))

    def _run_batch(self, samples, forward_params, postprocess_params):
        for sample in self.forward(self._collate(samples), **forward_params):
            yield self.postprocess(sample, **postprocess_params)


def left_padded_batch(processor, encoded: list[dict]) -> dict:
    """One generation batch from single-sample processor outputs (batch 1 each): token tensors left-padded, since
    generation continues on the right; image patches and grids concatenated in order."""
    length = max(e["input_ids"].shape[1] for e in encoded)
    padding = {"input_ids": processor.tokenizer.pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0}
    batch = {}
    for key, value in padding.items():
        batch[key] = torch.cat([torch.nn.functional.pad(e[key], (length - e[key].shape[1], 0), value=value)
                                for e in encoded])
    for key in ("pixel_values", "image_grid_thw"):
        batch[key] = torch.cat([e[key] for e in encoded])
    return batch


def split_by_sample(model, out, prompt_length: int, images: list[list[Image.Image]]) -> list[dict]:
    """The generate_with_masks output cut into one dict per row: its response ids, the offsets of its `<|seg|>`s in
    the response, their mask logits and, for each, the image it masks (the last one before it)."""
    vision_start = model.config.vision_start_token_id
    samples = []
    for row, row_images in enumerate(images):
        sequence = out.sequences[row]
        seg_images = [int((sequence[:index] == vision_start).sum()) - 1 for index in out.seg_positions[row]]
        samples.append({
            "response": sequence[prompt_length:],
            "seg_offsets": [index - prompt_length for index in out.seg_positions[row]],
            "mask_logits": out.mask_logits[row],
            "images": [row_images[i] for i in seg_images],
        })
    return samples


def segmentation_result(model, processor, sample: dict, threshold=None, refiner=None, seed: int = 0) -> dict:
    """{"text", "masks": [{"label", "score", "mask"}]} for one sample of `split_by_sample` (see the pipeline)."""
    threshold = model.config.mask_threshold if threshold is None else threshold
    tokenizer = processor.tokenizer
    response = sample["response"].tolist()
    end = response_end(model, tokenizer, response)
    masks, previous = [], 0
    for k, (offset, logits, image) in enumerate(zip(sample["seg_offsets"], sample["mask_logits"], sample["images"])):
        label = tokenizer.decode(response[previous:offset], skip_special_tokens=True).strip(" .,;:\n")
        previous = offset + 1
        (mask,), = processor.post_process_masks([[logits]], [(image.height, image.width)], threshold)
        probabilities = logits.float().sigmoid()[logits > threshold]
        score = float(probabilities.mean()) if probabilities.numel() else 0.0
        mask = mask.numpy()
        if refiner is not None:
            mask = refiner.refine(image, mask, seed=seed + k)
        masks.append({"label": label, "score": score, "mask": Image.fromarray(mask.astype(np.uint8) * 255, "L")})
    return {"text": tokenizer.decode(response[:end], skip_special_tokens=False), "masks": masks}


def response_end(model, tokenizer, response: list[int]) -> int:
    """Index of the response's first end token (an end-of-turn id, or padding that a batch row gets after it ended);
    len(response) if generation stopped at max_new_tokens."""
    stops = set(_as_list(model.generation_config.eos_token_id)) | {tokenizer.pad_token_id}
    return next((i for i, token in enumerate(response) if token in stops), len(response))


def _is_chat(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _as_list(value):
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _load_image(image, timeout=None) -> Image.Image:
    """An upright RGB PIL image from a path, URL, PIL image or (H, W, 3) uint8 array (EXIF orientation applied)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"a numpy image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        image = Image.fromarray(image)
    return load_image(image, timeout=timeout)


def _load_chat_images(messages, timeout=None):
    """The chat with every image entry loaded (upright RGB PIL), and those images in order."""
    loaded, images = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            items = []
            for item in content:
                source = next((item[k] for k in ("image", "url", "path") if k in item), None)
                if item.get("type") == "image" or "image" in item:
                    if source is None:
                        raise ValueError(f"an image entry of the chat has no 'image', 'url' or 'path': {item}")
                    images.append(_load_image(source, timeout))
                    item = {"type": "image", "image": images[-1]}
                items.append(item)
            content = items
        loaded.append({**message, "content": content})
    return loaded, images


def register_pipeline():
    """Makes PIPELINE_TASK a task of this process. transformers reads `config.custom_pipelines` only when the model is
    given by name, so `pipeline(PIPELINE_TASK, model=<a loaded STAMP>, processor=...)` needs the registry; the
    modeling file calls this on import. A registration already made (by this package or another STAMP checkpoint's
    remote code) is kept: the pipeline code is the same, and re-registering would warn on every load."""
    from transformers.pipelines import PIPELINE_REGISTRY

    if PIPELINE_TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            PIPELINE_TASK, pipeline_class=STAMPSegmentationPipeline, pt_model=AutoModel, type="multimodal"
        )


__all__ = [
    "DEFAULT_SAM_MODEL",
    "PIPELINE_TASK",
    "STAMPSegmentationPipeline",
    "left_padded_batch",
    "register_pipeline",
    "response_end",
    "segmentation_result",
    "split_by_sample",
]
