"""The training format's polygon and RLE mask specifications as COCO RLE, without torch: shared by the dataset's mask
loading (stamp_hf.data) and `stamp-hf prepare-data`, which so starts without importing torch and transformers (about
0.8 GB of resident memory and several seconds less)."""


def mask_rle(spec: dict, size: tuple[int, int], where: str) -> dict:
    """A {"polygons": ...} or {"rle": ...} mask as pycocotools' compressed RLE (counts as bytes) at `size` = (width,
    height): what `load_mask` decodes, and what `stamp-hf prepare-data` writes."""
    width, height = size
    mask_utils = pycocotools_mask(where)
    if "polygons" in spec:
        polygons = spec["polygons"]
        if not isinstance(polygons, list) or not polygons or any(
            not isinstance(p, list) or len(p) < 6 or len(p) % 2 for p in polygons
        ):
            raise ValueError(f"{where}: 'polygons' must be a list of [x0, y0, x1, y1, ...] lists of >= 3 points")
        return mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in polygons], height, width))
    rle = spec["rle"]
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"{where}: 'rle' needs 'size' [h, w] and 'counts'")
    if list(rle["size"]) != [height, width]:
        raise ValueError(f"{where}: RLE size {list(rle['size'])} but the image is [{height}, {width}] (h, w)")
    if isinstance(rle["counts"], list):  # uncompressed
        return mask_utils.frPyObjects(rle, height, width)
    if isinstance(rle["counts"], str):
        return dict(rle, counts=rle["counts"].encode())
    return rle


def pycocotools_mask(where):
    """pycocotools' mask module, or a one-line ImportError naming `where` with the pip command."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise ImportError(f"{where}: polygon and RLE masks need pycocotools (pip install 'stamp-hf[train]')") from None
    return mask_utils


__all__ = ["mask_rle", "pycocotools_mask"]
