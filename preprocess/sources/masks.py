"""Segmentation mask files -> soft target maps in [-1, 1] (+1 salient, -1 background, 0 unknown).

Shared by the mask-folder (Flowers-17 / Oxford) and Pascal VOC sources. The value mapping, by
`kind` (`auto` picks one from the file, see `detect_kind`):

    binary    0 -> background; anything else -> foreground (covers 0/1 and 0/255 masks)
    trimap    Oxford-IIIT Pet: 1 -> foreground, 2 -> background, 3 -> unknown (boundary)
    grey3     grey trimap: 0 -> background, 255 -> foreground, any other level (e.g. 128) -> unknown
    palette   VOC-style indexed PNG: 0 -> background, 255 (void / object border) -> unknown,
              any other index (a class or instance) -> foreground

Unknown pixels become 0 ("soft 0": grey 128 once stored), so the blur treats the uncertain border
as neither salient nor background. Masks are read with PIL so a palette PNG keeps its indices
(cv2 would expand them to the palette's colours).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MASK_KINDS = ("auto", "binary", "trimap", "grey3", "palette")
VOID_INDEX = 255


class MaskError(ValueError):
    """A mask file cannot be read or mapped; the message names the file, `reason` is the skip reason."""

    def __init__(self, msg: str, reason: str = "unreadable mask"):
        super().__init__(msg)
        self.reason = reason


def read_mask_values(path: str | Path, max_pixels: int = 0) -> tuple[np.ndarray, bool]:
    """(H x W integer array of the stored values, whether the PNG is palette-indexed).

    With `max_pixels`, a mask whose header declares more pixels is refused before it is decoded."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # --max-pixels decides
            im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise MaskError(f"{path}: too large ({e})", "mask too large") from None
    except FileNotFoundError:
        raise MaskError(f"{path}: missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MaskError(f"{path}: not a readable mask image ({e})") from None
    try:
        with im:
            if max_pixels and im.size[0] * im.size[1] > max_pixels:
                raise MaskError(f"{path}: {im.size[0]}x{im.size[1]} pixels, more than --max-pixels {max_pixels}",
                                "mask too large")
            im.load()
            palette = im.mode == "P"
            if im.mode in ("P", "L", "I", "I;16", "1"):
                arr = np.asarray(im if im.mode != "1" else im.convert("L"))
            else:  # an RGB(A) mask: any non-black pixel is foreground
                arr = (np.asarray(im.convert("L")) > 0).astype(np.uint8) * 255
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MaskError(f"{path}: not a readable mask image ({e})") from None
    return np.asarray(arr).astype(np.int32, copy=False), palette


def detect_kind(values: np.ndarray, palette: bool) -> str:
    """Guess the mapping from a mask's values (see the module docstring)."""
    if palette:
        return "palette"
    present = set(np.unique(values).tolist())
    if present and present <= {1, 2, 3} and (2 in present or 3 in present):
        return "trimap"
    if len(present - {0, 255}) > 0 and 0 in present and 255 in present:
        return "grey3"
    return "binary"


def map_mask(values: np.ndarray, kind: str) -> np.ndarray:
    """Stored mask values -> float32 target map in {-1, 0, +1}."""
    out = np.full(values.shape, -1.0, dtype=np.float32)
    if kind == "binary":
        out[values != 0] = 1.0
    elif kind == "trimap":
        out[values == 1] = 1.0
        out[values == 3] = 0.0
    elif kind == "grey3":
        out[values == 255] = 1.0
        out[(values != 0) & (values != 255)] = 0.0
    elif kind == "palette":
        out[(values != 0) & (values != VOID_INDEX)] = 1.0
        out[values == VOID_INDEX] = 0.0
    else:
        raise MaskError(f"unknown mask kind {kind!r}; one of {MASK_KINDS}")
    return out


def load_mask(path: str | Path, kind: str = "auto", shape: tuple[int, int] | None = None,
              max_pixels: int = 0) -> tuple[np.ndarray, str | None]:
    """(target map in {-1, 0, 1}, warning or None). With `shape` = (H, W) of the image, a mask
    of another size is resized with nearest neighbour (keeps the three levels) and a warning
    naming both sizes is returned for the build's log and manifest."""
    import cv2

    values, palette = read_mask_values(path, max_pixels)
    target = map_mask(values, detect_kind(values, palette) if kind == "auto" else kind)
    warning = None
    if shape is not None and target.shape != tuple(shape):
        warning = (f"{path}: mask is {target.shape[1]}x{target.shape[0]}, image is {shape[1]}x{shape[0]}; "
                   "resized with nearest neighbour")
        target = cv2.resize(target, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return target, warning


def mask_bbox(target: np.ndarray) -> list[float] | None:
    """[x, y, w, h] of the foreground (+1) pixels, or None when there are none
    (`--saliency box` on a mask source: the paper's coarser map)."""
    ys, xs = np.nonzero(target > 0)
    if len(xs) == 0:
        return None
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]
