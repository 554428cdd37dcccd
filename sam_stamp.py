"""Optional SAM refinement of STAMP's coarse masks (paper, Algorithm 1: mask_i <- Refine(mask_i, SAM)).

From a coarse mask: positive and negative points sampled with a seed, plus the mask itself as SAM's low-resolution
mask prompt; one SAM prediction, then two rounds that feed SAM's own low-resolution logits back as the mask prompt
(multimask_output=False, the first mask kept). Two protocols (SAM_PROTOCOLS) choose the points and the mask prompt:
  "official": the official STAMP eval (eval/eval_refer_seg.py + eval/utils.py): 10 + 10 points drawn uniformly from
              the foreground and the background (`official_points`; seeded here, unseeded there) and its mask prompt
              (`official_mask_prompt`, padding quirk included);
  "stamp":    this package's: 3 + 3 points at pixel centres (`sample_points`), a +-20 logit prompt padded with -20
              (`mask_prompt`).
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
SAM_PROTOCOLS = ("official", "stamp")
OFFICIAL_POINTS = 10  # per side: masks_sample_points' k = np.random.randint(10, 11)
OFFICIAL_PROMPT_EPS = 1e-3  # compute_logits_from_mask's clamp


def sample_points(mask, num_positive: int = 3, num_negative: int = 3, seed: int = 0):
    """The "stamp" protocol's points, in original pixel coordinates (x, y) at pixel centres, drawn from the foreground
    (label 1) and the background (label 0) of `mask`, reproducibly from `seed`. Returns float32 (K, 2) coordinates
    and int64 (K,) labels."""
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


def official_points(mask, seed: int = 0):
    """The "official" protocol's points, as the official `masks_sample_points` draws them: up to OFFICIAL_POINTS
    foreground pixels (label 1), then up to OFFICIAL_POINTS background pixels (label 0), each the first entries of a
    `torch.randperm` of that side's pixels in row-major order; coordinates (x, y) are the pixel indices (no +0.5), in
    original pixel coordinates. The official draw uses torch's unseeded global generator; here a generator seeded
    with `seed`, so `torch.manual_seed(seed)` before the official function gives the same points. Returns float64
    (K, 2) coordinates and uint8 (K,) labels, the official dtypes."""
    mask = torch.as_tensor(np.asarray(mask, dtype=bool))
    height, width = mask.shape
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    generator = torch.Generator().manual_seed(seed)
    coords, labels = [], []
    for label, select in ((1, mask), (0, ~mask)):
        x, y = xs[select], ys[select]
        picked = torch.randperm(x.numel(), generator=generator)[:OFFICIAL_POINTS]
        coords.append(torch.stack([x[picked], y[picked]], 1))
        labels.append(np.full(len(picked), label, dtype=np.uint8))
    return torch.cat(coords).numpy(), np.concatenate(labels)


def _prompt_shape(height: int, width: int, prompt_size: int) -> tuple[int, int]:
    """SAM's ResizeLongestSide target for a (height, width) mask: longest side -> prompt_size, rounded half up. A side
    that rounds to 0 px (aspect ratio over 2 * prompt_size) is a ValueError: no prompt can be built."""
    scale = prompt_size * 1.0 / max(height, width)
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    if min(new_h, new_w) == 0:
        raise ValueError(f"a {height}x{width} mask has a side of 0 px at SAM's {prompt_size} px mask prompt")
    return new_h, new_w


def mask_prompt(mask, prompt_size: int = SAM_MASK_PROMPT_SIZE) -> torch.Tensor:
    """The "stamp" protocol's low-resolution mask prompt for a (H, W) binary mask: a (1, 1, prompt_size, prompt_size)
    logit map on SAM's input frame, i.e. the mask resized so that its longest side is prompt_size (aspect kept, no
    stretching), as +-MASK_PROMPT_LOGIT, and padded with background (-MASK_PROMPT_LOGIT) at the bottom and right, as
    SAM pads the image."""
    mask = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    new_h, new_w = _prompt_shape(*mask.shape, prompt_size)
    resized = F.interpolate(mask[None, None], size=(new_h, new_w), mode="bilinear", align_corners=False)
    logits = (resized * 2 - 1) * MASK_PROMPT_LOGIT
    return F.pad(logits, (0, prompt_size - new_w, 0, prompt_size - new_h), value=-MASK_PROMPT_LOGIT)


def official_mask_prompt(mask) -> np.ndarray:
    """The "official" protocol's mask prompt, bit for bit what the official `compute_logits_from_mask` returns: the
    mask as a 0/255 uint8 image, resized with PIL's bilinear filter so that its longest side is 256, padded at the
    bottom and right with -1, which wraps to 255 on uint8: the padding reads as certain FOREGROUND (the official
    comment meant background), then / 255, 0 -> 1e-3 and 1 -> 1 - 1e-3, and the inverse sigmoid (+-6.9 at the
    extremes). A (1, 256, 256) float64 array; for a mask of exactly 256 x 256 the official code skips the 0/255
    conversion, so its foreground reads 1/255 (logit -5.5, below 0), float32, and that quirk is kept too."""
    mask = np.asarray(mask, dtype=bool)
    size = SAM_MASK_PROMPT_SIZE
    if mask.shape == (size, size):
        levels = mask.astype(np.float32) / 255.0
    else:
        new_h, new_w = _prompt_shape(*mask.shape, size)
        image = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize((new_w, new_h), Image.BILINEAR)
        padded = np.full((size, size), 255, dtype=np.uint8)  # np.pad(..., constant_values=-1) on uint8
        padded[:new_h, :new_w] = np.asarray(image)
        levels = padded / 255.0
    levels[levels >= 1] = 1 - OFFICIAL_PROMPT_EPS
    levels[levels == 0] = OFFICIAL_PROMPT_EPS
    return np.log(levels / (1 - levels))[None]


def protocol_prompts(mask, protocol: str, seed: int = 0):
    """(point coordinates, point labels, mask prompt) for a coarse mask under `protocol` (one of SAM_PROTOCOLS)."""
    if protocol == "official":
        return (*official_points(mask, seed), official_mask_prompt(mask))
    if protocol == "stamp":
        return (*sample_points(mask, seed=seed), mask_prompt(mask))
    raise ValueError(f"SAM protocol must be one of {SAM_PROTOCOLS}, got {protocol!r}")


class _SamRefiner:
    """One prediction, then REFINEMENT_ROUNDS rounds feeding SAM's low-res logits back, prompted from a coarse mask."""

    @torch.no_grad()
    def refine(self, image: Image.Image, mask, seed: int = 0, protocol: str = "stamp") -> np.ndarray:
        """A refined (H, W) boolean mask at the image's size, prompted as `protocol` says (SAM_PROTOCOLS); an empty
        coarse mask stays empty. A mask no prompt can be built for (a side of 0 px at 256, i.e. an aspect ratio over
        512, the one error the official code's `except Exception` can meet from its inputs) gives an empty mask, as
        there; any other error (SAM's own, out of memory) is raised."""
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return mask
        try:
            points, labels, prompt = protocol_prompts(mask, protocol, seed)
        except ValueError:
            if protocol not in SAM_PROTOCOLS:
                raise
            return np.zeros_like(mask)
        return self._predict(image, points, labels, torch.as_tensor(prompt).reshape(1, 1, *prompt.shape[-2:]))


class TransformersSamRefiner(_SamRefiner):
    """Refinement with transformers' `SamModel` + `SamProcessor` (e.g. facebook/sam-vit-huge)."""

    def __init__(self, model, processor):
        self.model, self.processor = model.eval(), processor

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "TransformersSamRefiner":
        from transformers import SamModel, SamProcessor

        model = SamModel.from_pretrained(name_or_path, use_safetensors=True, **kwargs)
        return cls(model, SamProcessor.from_pretrained(name_or_path))

    def _predict(self, image: Image.Image, points, labels, prompt: torch.Tensor) -> np.ndarray:
        inputs = self.processor(
            images=image.convert("RGB"),
            input_points=[[points.tolist()]],
            input_labels=[[labels.tolist()]],
            return_tensors="pt",
        )
        device, dtype = self.model.device, self.model.dtype
        embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(device, dtype))
        low_res = prompt.to(device, dtype)  # (1, 1, 256, 256)
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

    def _predict(self, image: Image.Image, points, labels, prompt: torch.Tensor) -> np.ndarray:
        self.predictor.set_image(np.asarray(image.convert("RGB")))  # RGB uint8 HWC, as SamPredictor expects
        low_res = prompt[0].numpy()  # (1, 256, 256); SamPredictor casts it to float32
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
    "SAM_PROTOCOLS",
    "SegmentAnythingRefiner",
    "TransformersSamRefiner",
    "load_sam_state_dict",
    "mask_prompt",
    "official_mask_prompt",
    "official_points",
    "protocol_prompts",
    "sam_refiner",
    "sample_points",
    "segment_anything_model_type",
]
