"""The "stamp-segmentation" pipeline: an image and a sentence (or a chat) in, the answer and one mask per `<|seg|>` out.

    pipe = pipeline("stamp-segmentation", model="org/stamp-2b", trust_remote_code=True)
    pipe("photo.jpg", "Please segment the cat.")
    # {"text": "Sure, it is <|seg|>.", "masks": [{"label": "Sure, it is", "score": 0.93, "image": 0, "mask": <PIL L>}]}

Hub remote code: imports only torch, transformers, PIL, numpy and the other `*_stamp.py` files.
"""

import threading
from types import SimpleNamespace

import numpy as np
from PIL import Image
from transformers import AutoModel, GenerationConfig, Pipeline
from transformers.utils import logging

from .processing_stamp import left_padded_batch, user_turn
from .sam_stamp import sam_refiner

logger = logging.get_logger(__name__)
_REFINERS_LOCK = threading.Lock()

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
    With SAM refinement, "mask" is SAM's and "coarse_mask" STAMP's own. The masks are the processor's
    `post_process_generation` (the one post-processing), as PIL images.

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
        """SAM refiners are loaded once per pipeline and source (the first call that asks loads it, under a lock, so
        threads sharing the pipeline neither load it twice nor see a half-filled cache)."""
        key = source if isinstance(source, str) else id(source)
        with _REFINERS_LOCK:
            cache = self.__dict__.setdefault("_sam_refiners", {})
            if key not in cache:
                cache[key] = sam_refiner(source)
            return cache[key]

    # ------------------------------------------------------------------ preprocess / forward / postprocess

    def preprocess(self, inputs, timeout=None):
        """The input's chat encoded (every image decoded once, by `load_image`), its images' sizes and the images
        themselves (kept for SAM, which refines on the pixels; they never go through the model call)."""
        if not isinstance(inputs, dict) or not ({"messages"} <= inputs.keys() or {"image", "prompt"} <= inputs.keys()):
            raise ValueError(
                "give an image and a prompt, a chat (list of messages), or a dict with 'image' and 'prompt' or "
                f"'messages'; got {type(inputs).__name__}"
            )
        if "prompt" in inputs:
            check_prompt(inputs["prompt"])
        messages = inputs["messages"] if "messages" in inputs else [user_turn([inputs["image"]], inputs["prompt"])]
        encoded, images = self.processor.encode_chat(messages, timeout)
        if not images:
            raise ValueError("STAMP segments images: the input holds no image")
        return {"inputs": dict(encoded), "sizes": [(image.height, image.width) for image in images], "images": images}

    def collate(self, samples: list[dict]) -> dict:
        """The model inputs of preprocessed samples as one left-padded batch."""
        return left_padded_batch(self.processor, [s["inputs"] for s in samples])

    def _forward(self, model_inputs, **generate_kwargs):
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        out = self.model.generate_with_masks(**model_inputs, **generate_kwargs)
        return {"sequences": out.sequences, "seg_positions": out.seg_positions, "seg_images": out.seg_images,
                "mask_logits": out.mask_logits, "prompt_length": model_inputs["input_ids"].shape[1]}

    def postprocess(self, batch, threshold=None, resample=None, refiner=None, seed=0, sam_protocol=None):
        """One result per sample of `batch` = {"outputs": `_forward`'s, "samples": the preprocessed samples}: the
        processor's `post_process_generation` (the model's threshold and stop tokens unless given; `threshold` may be
        one per sample), then `finish_results`."""
        outputs = SimpleNamespace(**batch["outputs"])
        results = self.processor.post_process_generation(
            outputs, outputs.prompt_length, [s["sizes"] for s in batch["samples"]],
            self.model.config.mask_threshold if threshold is None else threshold, resample,
            self.model.generation_config.eos_token_id,
        )
        images = [s["images"] for s in batch["samples"]]
        return finish_results(results, images, refiner, seed, sam_protocol or self.processor.sam_protocol)

    # ------------------------------------------------------------------ batching: our collate, one output per input

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        if num_workers:
            logger.warning("the stamp-segmentation pipeline preprocesses in its own thread: num_workers is ignored")

        def results():
            batch = []
            for item in inputs:
                batch.append(self.preprocess(item, **preprocess_params))
                if len(batch) == batch_size:
                    yield from self.run_batch(batch, forward_params, postprocess_params)
                    batch = []
            if batch:
                yield from self.run_batch(batch, forward_params, postprocess_params)

        return results()

    def run_single(self, inputs, preprocess_params, forward_params, postprocess_params):
        return self.run_batch([self.preprocess(inputs, **preprocess_params)], forward_params, postprocess_params)[0]

    def run_batch(self, samples: list[dict], forward_params: dict, postprocess_params: dict) -> list[dict]:
        """Preprocessed samples through one model call and the post-processing: one result per sample."""
        outputs = self.forward(self.collate(samples), **forward_params)
        return self.postprocess({"outputs": outputs, "samples": samples}, **postprocess_params)


def finish_results(results: list[dict], images: list[list[Image.Image]], refiner=None, seed: int = 0,
                   sam_protocol: str = "stamp") -> list[dict]:
    """The pipeline's output from `post_process_generation`'s: each mask as a PIL "L" image (0 / 255), as
    transformers' image-segmentation pipeline gives masks; with a SAM `refiner`, refined on its image (the k-th mask of
    a sample with points drawn from seed + k, prompted as `sam_protocol` says), STAMP's own mask kept as
    "coarse_mask"."""
    for result, row_images in zip(results, images, strict=True):
        for k, entry in enumerate(result["masks"]):
            mask = entry["mask"]
            if refiner is not None:
                entry["coarse_mask"] = _pil_mask(mask)
                mask = refiner.refine(row_images[entry["image"]], mask, seed=seed + k, protocol=sam_protocol)
            entry["mask"] = _pil_mask(mask)
    return results


def _pil_mask(mask) -> Image.Image:
    return Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, "L")


def check_prompt(prompt) -> str:
    """A request's text: a non-empty string (the one message, everywhere a prompt is taken)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: say what to segment, e.g. \"Please segment the red circle.\"")
    return prompt


def _is_chat(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


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
    "check_prompt",
    "finish_results",
    "register_pipeline",
]
