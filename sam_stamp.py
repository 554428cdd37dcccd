"""Optional SAM refinement of STAMP's coarse masks (paper, Algorithm 1: mask_i <- Refine(mask_i, SAM)).

From a coarse mask: positive and negative points sampled with a seed, plus the mask itself as SAM's low-resolution
mask prompt; one SAM prediction, then two rounds that feed SAM's own low-resolution logits back as the mask prompt.
Two backends with the same geometry: transformers' `SamModel` (Hub checkpoints, safetensors) and the
`segment-anything` package's `SamPredictor` (the original .pth checkpoints, read with torch.load(weights_only=True)).

Hub remote code: imports only torch, transformers, PIL and numpy; segment-anything is imported only when used.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SAM_IMAGE_SIZE = 1024  # SAM resizes the longest side to this and pads bottom/right to a square
SAM_MASK_PROMPT_SIZE = 256  # its low-resolution mask prompt / output covers that padded square at 1/4 scale
MASK_PROMPT_LOGIT = 20.0  # logit given to certain foreground / background in a mask prompt built from a binary mask
REFINEMENT_ROUNDS = 2  # after the first prediction


def sample_points(mask, num_positive: int = 3, num_negative: int = 3, seed: int = 0):
    """Points in original pixel coordinates (x, y) drawn from the foreground (label 1) and the background (label 0)
    of `mask`, reproducibly from `seed`. Returns float32 (K, 2) coordinates and int64 (K,) labels."""
    mask = np.asarray(mask, dtype=bool)
    rng = np.random.default_rng(seed)
    coords, labels = [], []
    for label, count in ((1, num_positive), (0, num_negative)):
        ys, xs = np.nonzero(mask == bool(label))
        if len(ys) == 0 or count == 0:
            continue
        picked = rng.choice(len(ys), size=min(count, len(ys)), replace=False)
        coords.append(np.stack([xs[picked], ys[picked]], 1) + 0.5)  # pixel centres
        labels.append(np.full(len(picked), label))
    if not coords:
        return np.zeros((0, 2), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(coords).astype(np.float32), np.concatenate(labels).astype(np.int64)


def mask_prompt(mask, prompt_size: int = SAM_MASK_PROMPT_SIZE) -> torch.Tensor:
    """SAM's low-resolution mask prompt for a (H, W) binary mask: a (1, 1, prompt_size, prompt_size) logit map on
    SAM's input frame, i.e. the mask resized so that its longest side is prompt_size (aspect kept, no stretching)
    and padded with background at the bottom and right, as SAM pads the image."""
    mask = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    height, width = mask.shape
    scale = prompt_size / max(height, width)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)  # SAM's ResizeLongestSide rounding
    resized = F.interpolate(mask[None, None], size=(new_h, new_w), mode="bilinear", align_corners=False)
    logits = (resized * 2 - 1) * MASK_PROMPT_LOGIT
    return F.pad(logits, (0, prompt_size - new_w, 0, prompt_size - new_h), value=-MASK_PROMPT_LOGIT)


class _SamRefiner:
    """One prediction, then REFINEMENT_ROUNDS rounds feeding SAM's low-res logits back, prompted from a coarse mask."""

    @torch.no_grad()
    def refine(self, image: Image.Image, mask, seed: int = 0) -> np.ndarray:
        """A refined (H, W) boolean mask at the image's size; an empty coarse mask stays empty."""
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return mask
        points, labels = sample_points(mask, seed=seed)
        return self._predict(image, mask, points, labels)


class TransformersSamRefiner(_SamRefiner):
    """Refinement with transformers' `SamModel` + `SamProcessor` (e.g. facebook/sam-vit-huge)."""

    def __init__(self, model, processor):
        self.model, self.processor = model.eval(), processor

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "TransformersSamRefiner":
        from transformers import SamModel, SamProcessor

        model = SamModel.from_pretrained(name_or_path, use_safetensors=True, **kwargs)
        return cls(model, SamProcessor.from_pretrained(name_or_path))

    def _predict(self, image: Image.Image, mask: np.ndarray, points, labels) -> np.ndarray:
        inputs = self.processor(
            images=image.convert("RGB"),
            input_points=[[points.tolist()]],
            input_labels=[[labels.tolist()]],
            return_tensors="pt",
        )
        device, dtype = self.model.device, self.model.dtype
        embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(device, dtype))
        low_res = mask_prompt(mask).to(device, dtype)
        for _ in range(1 + REFINEMENT_ROUNDS):
            out = self.model(
                image_embeddings=embeddings,
                input_points=inputs["input_points"].to(device, dtype),
                input_labels=inputs["input_labels"].to(device),
                input_masks=low_res,
                multimask_output=False,
            )
            low_res = out.pred_masks[:, 0]  # (1, 1, 256, 256) logits, fed back as the next mask prompt
        masks = self.processor.post_process_masks(
            out.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )
        return masks[0][0, 0].numpy().astype(bool)


class SegmentAnythingRefiner(_SamRefiner):
    """Refinement with the `segment-anything` package's `SamPredictor` (the original .pth checkpoints)."""

    def __init__(self, sam):
        try:
            from segment_anything import SamPredictor
        except ImportError as error:
            raise ImportError("SAM refinement with a .pth checkpoint needs `pip install segment-anything`") from error
        self.predictor = SamPredictor(sam.eval())

    @classmethod
    def from_checkpoint(cls, checkpoint: str, model_type: str | None = None) -> "SegmentAnythingRefiner":
        """Builds the SAM variant the checkpoint holds (vit_h / vit_l / vit_b, read from its weights unless given)."""
        try:
            from segment_anything import sam_model_registry
        except ImportError as error:
            raise ImportError("SAM refinement with a .pth checkpoint needs `pip install segment-anything`") from error
        state_dict = load_sam_state_dict(checkpoint)
        sam = sam_model_registry[model_type or segment_anything_model_type(state_dict, checkpoint)]()
        sam.load_state_dict(state_dict)
        return cls(sam)

    def _predict(self, image: Image.Image, mask: np.ndarray, points, labels) -> np.ndarray:
        self.predictor.set_image(np.asarray(image.convert("RGB")))  # RGB uint8 HWC, as SamPredictor expects
        low_res = mask_prompt(mask)[0].numpy()  # (1, 256, 256)
        for _ in range(1 + REFINEMENT_ROUNDS):
            masks, _, low_res = self.predictor.predict(
                point_coords=points, point_labels=labels, mask_input=low_res, multimask_output=False
            )
        return masks[0].astype(bool)


def segment_anything_model_type(state_dict: dict, checkpoint: str = "the checkpoint") -> str:
    """vit_h / vit_l / vit_b: the segment-anything variant whose image encoder width the weights have."""
    weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        raise ValueError(f"{checkpoint}: no image_encoder.patch_embed.proj.weight: not a segment-anything SAM")
    width = weight.shape[0]
    model_type = {1280: "vit_h", 1024: "vit_l", 768: "vit_b"}.get(width)
    if model_type is None:
        raise ValueError(f"{checkpoint}: unknown SAM image encoder width {width}; pass model_type")
    return model_type


def load_sam_state_dict(checkpoint: str) -> dict:
    """A SAM .pth state dict read with weights_only=True: tensors only, no pickled code runs."""
    try:
        state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(
            f"{checkpoint}: not a plain SAM state dict; only tensors are read (weights_only=True) ({error})"
        ) from error
    return state_dict.get("model", state_dict) if isinstance(state_dict, dict) else state_dict


def sam_refiner(source):
    """A refiner from a refiner object, a .pth checkpoint (segment-anything) or a Hub id / folder (transformers)."""
    if hasattr(source, "refine"):
        return source
    if str(source).endswith((".pth", ".pt")):
        return SegmentAnythingRefiner.from_checkpoint(str(source))
    return TransformersSamRefiner.from_pretrained(str(source))


__all__ = [
    "SegmentAnythingRefiner",
    "TransformersSamRefiner",
    "load_sam_state_dict",
    "mask_prompt",
    "sam_refiner",
    "sample_points",
    "segment_anything_model_type",
]
