"""Masks drawn on their image: each mask in its own colour, blended with transparency, with a solid outline."""

import numpy as np
from PIL import Image, ImageFilter

# distinct, colour-blind-friendly colours (Okabe-Ito), cycled when there are more masks
PALETTE = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167))


def overlay_masks(image: Image.Image, masks, alpha: float = 0.5, outline: int = 2) -> Image.Image:
    """An RGB copy of `image` with mask k tinted PALETTE[k] at `alpha` and outlined `outline` px wide in that colour.
    Pixels outside every mask keep their original values. `masks`: PIL "L" images or (H, W) arrays, image size."""
    canvas = np.asarray(image.convert("RGB")).astype(np.float32)
    for k, mask in enumerate(masks):
        mask_image = mask if isinstance(mask, Image.Image) else Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
        if mask_image.size != image.size:
            raise ValueError(f"mask {k} is {mask_image.size[0]}x{mask_image.size[1]}, the image {image.width}x{image.height}")
        inside = np.asarray(mask_image.convert("L")) > 127
        colour = np.array(PALETTE[k % len(PALETTE)], dtype=np.float32)
        canvas[inside] = (1 - alpha) * canvas[inside] + alpha * colour
        if outline:
            eroded = np.asarray(mask_image.convert("L").filter(ImageFilter.MinFilter(2 * outline + 1))) > 127
            canvas[inside & ~eroded] = colour
    return Image.fromarray(canvas.round().astype(np.uint8))
