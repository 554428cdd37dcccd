"""The "stamp-segmentation" pipeline: an image and a sentence (or a chat) in, the answer and one mask per `<|seg|>` out.

    pipe = pipeline("stamp-segmentation", model="org/stamp-2b", trust_remote_code=True)
    pipe("photo.jpg", "Please segment the cat.")
    # {"text": "Sure, it is <|seg|>.", "masks": [{"label": "Sure, it is", "score": 0.93, "image": 0, "mask": <PIL L>}]}

Hub remote code: imports only torch, transformers, PIL, numpy and the other `*_stamp.py` files.
"""

import numpy as np
from PIL import Image
from transformers import AutoModel, GenerationConfig, Pipeline

from .processing_stamp import left_padded_batch, user_turn
from .sam_stamp import sam_refiner

PIPELINE_TASK = "stamp-segmentation"
DEFAULT_SAM_MODEL = "facebook/sam-vit-huge"  # the SAM the paper refines with


class STAMPSegmentationPipeline(Pipeline):
    """
    Inputs, alone or in a list (batched by `batch_size`):
      - `pipe(image, prompt)`: image = path, URL, PIL image or (H, W, 3) uint8 numpy array; prompt = the user's text;
      - `pipe(messages)`: a chat (list of {"role", "content"} messages; image entries as in transformers' chat format);
      - `pipe({"image": ..., "prompt": ...})` or `pipe({"messages": [...]})`.
    Images are read by `processing_stamp.load_image` (upright from their EXIF orientation, any PIL mode as RGB); masks
    come at that upright size.

    Output per input: {"text": the response (with its `<|seg|>` tokens), "masks": one {"label", "score", "mask",
    "image"} per `<|seg|>`}. "mask" is a PIL "L" image (0 / 255) the size of the image the `<|seg|>` refers to (the last
    one before it; "image" is its index among the input's images); "score" is the mean foreground probability of its
    foreground patches (0.0 for an empty mask); "label" is the response text between the previous `<|seg|>` and this one.

    Call parameters: any `generate` argument (max_new_tokens, do_sample, generation_config, ...); `threshold` (logit
    threshold, default config.mask_threshold); `resample` ("nearest" / "bilinear", default the processor's
    `mask_resample`); `refine=True` to refine each mask with SAM, `sam_model` (a Hub id or
    folder for transformers' SamModel, a .pth path for segment-anything, or a refiner object; default
    facebook/sam-vit-huge), `seed` for the point sampling and `sam_protocol` ("official" / "stamp", default the
    processor's `sam_protocol`: see sam_stamp).
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

    def _sanitize_parameters(self, timeout=None, threshold=None, resample=None, refine=None, sam_model=None, seed=None,
                             sam_protocol=None, generate_kwargs=None, **generate_params):
        preprocess = {} if timeout is None else {"timeout": timeout}
        forward = {**(generate_kwargs or {}), **generate_params}
        if forward.get("num_return_sequences", 1) != 1:
            raise ValueError("the pipeline returns one answer per input; use model.generate_with_masks for several")
        postprocess = {}
        if threshold is not None:
            postprocess["threshold"] = threshold
        if resample is not None:
            postprocess["resample"] = resample
        if refine:
            postprocess["refiner"] = self._refiner(sam_model if sam_model is not None else DEFAULT_SAM_MODEL)
        if seed is not None:
            postprocess["seed"] = seed
        if sam_protocol is not None:
            postprocess["sam_protocol"] = sam_protocol
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
        messages = inputs["messages"] if "messages" in inputs else [user_turn([inputs["image"]], inputs["prompt"])]
        encoded, images = self.processor.encode_chat(messages, timeout)
        if not images:
            raise ValueError("STAMP segments images: the input holds no image")
        return {"inputs": dict(encoded), "images": [images]}

    def _collate(self, samples: list[dict]) -> dict:
        batch = left_padded_batch(self.processor, [s["inputs"] for s in samples])
        return {"inputs": batch, "images": [images for s in samples for images in s["images"]]}

    def _forward(self, model_inputs, **generate_kwargs):
        inputs = model_inputs["inputs"]
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        out = self.model.generate_with_masks(**inputs, **generate_kwargs)
        return split_by_sample(out, inputs["input_ids"].shape[1], model_inputs["images"])

    def postprocess(self, sample, threshold=None, resample=None, refiner=None, seed=0, sam_protocol=None):
        return segmentation_result(self.model, self.processor, sample, threshold, resample, refiner, seed, sam_protocol)

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


def split_by_sample(out, prompt_length: int, images: list[list[Image.Image]]) -> list[dict]:
    """The generate_with_masks output cut into one dict per row: its response ids, the offsets of its `<|seg|>`s in
    the response, their mask logits and, for each, the index and the image it masks (`out.seg_images`)."""
    samples = []
    for row, row_images in enumerate(images):
        samples.append({
            "response": out.sequences[row][prompt_length:],
            "seg_offsets": [index - prompt_length for index in out.seg_positions[row]],
            "mask_logits": out.mask_logits[row],
            "image_indices": list(out.seg_images[row]),
            "images": [row_images[i] for i in out.seg_images[row]],
        })
    return samples


def segmentation_result(model, processor, sample: dict, threshold=None, resample=None, refiner=None, seed: int = 0,
                        sam_protocol=None) -> dict:
    """The one post-processing step: {"text", "masks": [{"label", "score", "mask", "image"}]} for one sample of
    `split_by_sample` (see the pipeline). The threshold defaults to config.mask_threshold, the resampling to the
    processor's `mask_resample`; SAM (refiner) prompts as `sam_protocol` says (default the processor's) and draws its
    points with seed + k for the k-th mask."""
    threshold = model.config.mask_threshold if threshold is None else threshold
    sam_protocol = processor.sam_protocol if sam_protocol is None else sam_protocol
    tokenizer = processor.tokenizer
    response = sample["response"].tolist()
    end = response_end(model, tokenizer, response)
    masks, previous = [], 0
    pieces = zip(sample["seg_offsets"], sample["mask_logits"], sample["images"], sample["image_indices"])
    for k, (offset, logits, image, image_index) in enumerate(pieces):
        label = tokenizer.decode(response[previous:offset], skip_special_tokens=True).strip(" .,;:\n")
        previous = offset + 1
        (mask,), = processor.post_process_masks([[logits]], [(image.height, image.width)], threshold, resample)
        probabilities = logits.float().sigmoid()[logits > threshold]
        score = float(probabilities.mean()) if probabilities.numel() else 0.0
        mask = mask.cpu().numpy()
        if refiner is not None:
            mask = refiner.refine(image, mask, seed=seed + k, protocol=sam_protocol)
        masks.append({"label": label, "score": score, "image": image_index,
                      "mask": Image.fromarray(mask.astype(np.uint8) * 255, "L")})
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
    "register_pipeline",
    "response_end",
    "segmentation_result",
    "split_by_sample",
]
