"""Shared image geometry: decode to RGB/grey, square crops with context, one crop for image and saliency.

Every source hands the pipeline a decoded image plus a crop window in *source* pixel coordinates
(the coordinates of the original, full-size image that annotations use). The image may have been
decoded at a reduced size (libjpeg's DCT scaling, `cv2.IMREAD_REDUCED_*`), so an image carries its
`scale` (image px = source px * scale). `Crop` rounds the window to whole image pixels once and
then maps source coordinates to output pixels, so the image crop and every rasterized shape go
through exactly the same geometry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

_REDUCED = {  # (channels, factor) -> cv2 imread flag; factor 1 = full size
    (3, 1): cv2.IMREAD_COLOR, (3, 2): cv2.IMREAD_REDUCED_COLOR_2, (3, 4): cv2.IMREAD_REDUCED_COLOR_4,
    (3, 8): cv2.IMREAD_REDUCED_COLOR_8,
    (1, 1): cv2.IMREAD_GRAYSCALE, (1, 2): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (1, 4): cv2.IMREAD_REDUCED_GRAYSCALE_4, (1, 8): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


class ImageError(Exception):
    """An input image cannot be used (missing, undecodable, truncated); the message is the skip reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def reduction_for(min_crop_side: float, size: int) -> int:
    """Largest libjpeg reduction (1, 2, 4, 8) that keeps every crop at least `size` pixels wide,
    so the final resize still only shrinks and the output is as sharp as a full-size decode."""
    for k in (8, 4, 2):
        if min_crop_side / k >= size:
            return k
    return 1


def _looks_truncated(data: bytes) -> bool:
    """JPEG must end with an EOI marker (0xFFD9); libjpeg pads a cut file with grey and only warns."""
    if data[:2] == b"\xff\xd8":
        return data.rfind(b"\xff\xd9") < len(data) - 1024  # allow a little trailing junk after EOI
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data.rfind(b"IEND") < 0
    return False


def decode_image(path: str | Path, channels: int = 3, reduce: int = 1) -> tuple[np.ndarray, float]:
    """Read an image file as uint8 RGB (channels=3) or grey (channels=1), optionally reduced.

    Grey, RGBA, 16-bit and palette files are converted (OpenCV's IMREAD_COLOR/GRAYSCALE do it:
    alpha dropped, 16-bit scaled to 8). Returns (pixels, scale) with image px = source px * scale.
    Raises ImageError naming the problem (missing / truncated / undecodable)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError("missing image", str(path)) from None
    except OSError as e:
        raise ImageError("unreadable image", f"{path} ({e.strerror})") from None
    if _looks_truncated(data):
        raise ImageError("truncated image", str(path))
    img = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[(channels, reduce)])
    if img is None or img.size == 0:
        raise ImageError("undecodable image", str(path))
    if channels == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img, 1.0 / reduce


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Pixel arrays from readers that do not go through OpenCV (pickles, IDX, PIL): any of
    grey HxW / HxWx1, RGB, RGBA, uint16, bool, float in [0, 1] -> uint8 HxWx3 RGB or HxW grey."""
    a = np.asarray(img)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype.kind == "f":
        a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]  # alpha dropped, as OpenCV's IMREAD_COLOR does
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise ValueError(f"cannot make an image from an array of shape {a.shape}")
    if channels == 3 and a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif channels == 1 and a.ndim == 3:
        a = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2GRAY)
    return np.ascontiguousarray(a)


def square_window(box_xyxy, context: float) -> tuple[float, float, float]:
    """Square (x0, y0, side) centred on a box, side = longer box side * (1 + 2 * context)."""
    x0, y0, x1, y1 = box_xyxy
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * context)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return cx - side / 2.0, cy - side / 2.0, side


def clip_box(box_xyxy, width: float, height: float):
    """Clip a box to the image; None when nothing of it is left (or it has NaN / inf)."""
    x0, y0, x1, y1 = map(float, box_xyxy)
    isfinite = math.isfinite  # no generator here: the planner calls this once per annotation
    if not (isfinite(x0) and isfinite(y0) and isfinite(x1) and isfinite(y1)):
        return None
    x0, x1 = max(0.0, min(x0, x1)), min(float(width), max(x0, x1))
    y0, y1 = max(0.0, min(y0, y1)), min(float(height), max(y0, y1))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return x0, y0, x1, y1


@dataclass(frozen=True)
class Crop:
    """A square window of an image, in whole image pixels, and the map source coords -> output px."""

    ix0: int  # window origin in image pixels (may be negative: padded)
    iy0: int
    iside: int  # window side in image pixels
    scale: float  # image px per source px
    size: int  # output side

    @classmethod
    def make(cls, window, scale: float, size: int) -> "Crop":
        x0, y0, side = window
        iside = max(1, int(round(side * scale)))
        iside -= iside % _halving_unit(iside, size)  # < 1/size of the side: exact 2x halvings in shrink_to
        return cls(int(math.floor(x0 * scale + 0.5)), int(math.floor(y0 * scale + 0.5)), iside, scale, size)

    @classmethod
    def whole(cls, img_h: int, img_w: int, scale: float, size: int) -> "Crop":
        """The whole image, centred in a square (the short side padded) so nothing is distorted."""
        side = max(img_h, img_w)
        unit = _halving_unit(side, size)
        side += -side % unit  # pad (never cut) to a side that halves exactly
        return cls(-((side - img_w) // 2), -((side - img_h) // 2), side, scale, size)

    @property
    def source_xyxy(self) -> tuple[float, float, float, float]:
        """The window actually used, in source coordinates."""
        s = self.scale
        return self.ix0 / s, self.iy0 / s, (self.ix0 + self.iside) / s, (self.iy0 + self.iside) / s

    @property
    def factor(self) -> float:
        """Output pixels per source pixel."""
        return self.size / (self.iside / self.scale)

    def to_output(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) source coordinates -> output pixel coordinates (float64)."""
        x0, y0, _, _ = self.source_xyxy
        return (np.asarray(xy, np.float64) - (x0, y0)) * self.factor

    def box_to_output(self, box_xyxy) -> list[float]:
        (a, b), (c, d) = self.to_output(np.array([box_xyxy[:2], box_xyxy[2:]], np.float64))
        return [float(a), float(b), float(c), float(d)]

    def apply(self, img: np.ndarray, interpolation_up=cv2.INTER_LINEAR) -> np.ndarray:
        """Cut the window out of `img` (zero padding outside) and resize it to size x size.

        Shrinking uses INTER_AREA (averages, no aliasing); growing uses `interpolation_up`."""
        h, w = img.shape[:2]
        x0, y0, x1, y1 = self.ix0, self.iy0, self.ix0 + self.iside, self.iy0 + self.iside
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if cx1 <= cx0 or cy1 <= cy0:  # window wholly outside: all padding
            shape = (self.size, self.size) + img.shape[2:]
            return np.zeros(shape, img.dtype)
        patch = img[cy0:cy1, cx0:cx1]
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            patch = cv2.copyMakeBorder(patch, cy0 - y0, y1 - cy1, cx0 - x0, x1 - cx1, cv2.BORDER_CONSTANT, value=0)
        if self.iside == self.size:
            return np.ascontiguousarray(patch)
        out = shrink_to(patch, self.size) if self.iside > self.size else \
            cv2.resize(patch, (self.size, self.size), interpolation=interpolation_up)
        return out.reshape((self.size, self.size) + img.shape[2:])


def _halving_unit(side: int, size: int) -> int:
    """2^k for the largest k with size * 2^k <= side (1 when not shrinking)."""
    unit = 1
    while size * unit * 2 <= side:
        unit *= 2
    return unit


def shrink_to(patch: np.ndarray, size: int) -> np.ndarray:
    """Square patch -> size x size without aliasing, mip-map style: exact 2x INTER_AREA halvings
    (2x2 box means) while the patch is at least twice the output, then one bilinear step of less
    than 2x. Why: OpenCV's INTER_AREA has a fast path for exact 2x only; at other ratios it cost
    50-300 us per crop (a third of a COCO build). Crop sides are snapped to a multiple of the
    halving unit (`_halving_unit`), so every halving is exact and the geometry stays exact."""
    side = patch.shape[0]
    while side >= 2 * size:
        side //= 2
        patch = cv2.resize(patch[: 2 * side, : 2 * side], (side, side), interpolation=cv2.INTER_AREA)
    if side == size:
        return patch
    return cv2.resize(patch, (size, size), interpolation=cv2.INTER_LINEAR)
