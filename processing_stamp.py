"""STAMPProcessor: Qwen2-VL image processor + tokenizer + chat template, and mask post-processing.

Hub remote code: imports only torch, transformers and the other `*_stamp.py` files.
"""

import copy

import torch
import torch.nn.functional as F
from transformers.image_utils import SizeDict
from transformers.processing_utils import ProcessorMixin

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
    """

    return_mm_token_type_ids = True

    def __init__(
        self, image_processor=None, tokenizer=None, chat_template=None, min_placeholders=1024, max_placeholders=1280, **kwargs
    ):
        if not 0 < min_placeholders <= max_placeholders:
            raise ValueError(
                f"need 0 < min_placeholders <= max_placeholders, got {min_placeholders} and {max_placeholders}"
            )
        self.min_placeholders = min_placeholders
        self.max_placeholders = max_placeholders
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

    def post_process_masks(self, mask_logits, target_sizes, threshold: float = 0.0):
        """
        Masks at the original image sizes.

        Args:
            mask_logits: the `mask_logits` of `generate_with_masks` / `predict_masks` (a list per sample of (h, w)
                logit grids), or the generate output itself.
            target_sizes: one (height, width) per sample: the size of the image before the processor resized it.
            threshold: foreground where the upsampled logit exceeds it (0.0: the paper's logit > 0).

        Returns:
            A list per sample of boolean (height, width) tensors, one per `<|seg|>`.

        See `upsample_mask_logits` for how a grid becomes an image-sized mask.
        """
        mask_logits = getattr(mask_logits, "mask_logits", mask_logits)
        if len(mask_logits) != len(target_sizes):
            raise ValueError(f"got mask logits for {len(mask_logits)} samples but {len(target_sizes)} target sizes")
        return [
            [upsample_mask_logits(grid, (height, width)) > threshold for grid in sample_logits]
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


__all__ = ["STAMPProcessor", "QWEN2_VL_CHAT_TEMPLATE", "upsample_mask_logits"]
