"""Shared image geometry: decode to RGB/grey, square crops with context, one crop for image and saliency.

Every source hands the pipeline a decoded image plus a crop window in *source* pixel coordinates
(the coordinates of the original, full-size image that annotations use). The image may have been
decoded at a reduced size (libjpeg's DCT scaling, `cv2.IMREAD_REDUCED_*`), so an image carries its
`scale` (image px = source px * scale). `Crop` rounds the window to whole image pixels once and
then maps source coordinates to output pixels, so the image crop and every rasterized shape go
through exactly the same geometry.

Why one file over 350 lines: decoding and cropping share that `scale` contract (the reduction a decode
may take is bounded by the smallest crop it must serve, `reduction_for`/`reduce_if_large`, and `Crop`
reads the scale back), so a change to one side is checked against the other here; the decode half
also guards untrusted files (header sniffing, pixel limits, paths) before OpenCV sees them.
"""
from __future__ import annotations

import functools
import math
import os
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
DEFAULT_MAX_PIXELS = 100_000_000  # --max-pixels: 100 MP is 300 MB decoded RGB, per worker
# JPEGs above this are decoded reduced when every crop allows it (sources that did not reduce
# before; COCO always did). 16 MP = 48 MB RGB: below it, full decoding costs little memory.
REDUCE_ABOVE_PIXELS = 16_000_000


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


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they hold the size
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOF segment, walking the segments (an EXIF thumbnail sits
    inside APP1 and is skipped whole, so its SOF is never mistaken for the image's)."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF:
            if i + 9 > n:
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker in (0xD9, 0xDA) or length < 2:  # end of image / start of scan before any SOF
            return None
        i += 2 + length
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) an image file declares, read from its header without decoding pixels.

    PNG (IHDR) and JPEG (SOF) are parsed here (microseconds); other formats go through PIL's lazy
    `Image.open`, which reads only the header. None when the size cannot be told; HeaderTooLarge
    when PIL refuses the file as a decompression bomb."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if data[12:16] != b"IHDR" or len(data) < 24:
            return None
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            # PIL warns (89 MP) or refuses (179 MP) by its own global limit; --max-pixels decides here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError as e:  # past PIL's own hard limit (179 MP): it names the count
        import re

        m = re.search(r"\((\d+) pixels\)", str(e))
        raise HeaderTooLarge(int(m.group(1)) if m else 0) from None
    except Exception:  # noqa: BLE001 - any header PIL cannot parse: size unknown, OpenCV decides
        return None


class HeaderTooLarge(Exception):
    """PIL refused to even open a huge image (past its own limit) and told only the pixel count."""

    def __init__(self, pixels: int):
        super().__init__(f"{pixels} pixels")
        self.pixels = pixels


def resolves_inside(path: str | Path, root: str | Path) -> bool:
    """Whether `path`, with every symlink followed, lies inside `root` (also resolved).

    The folder part is resolved once per folder (cached) and the file itself only when it is a
    link: one lstat per image instead of one per path component."""
    p = os.fspath(path)
    folder, name = os.path.split(p)
    real = os.path.normpath(os.path.join(_real_dir(folder or "."), name))
    if os.path.islink(real):
        real = os.path.realpath(real)
    top = _real_dir(os.fspath(root))
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


@functools.lru_cache(maxsize=4096)
def _real_dir(folder: str) -> str:
    return os.path.realpath(folder)


def reduce_if_large(size: int, min_crop_side: float | None = None):
    """A `reduce` argument for `decode_image`: a JPEG above REDUCE_ABOVE_PIXELS decodes at the
    largest libjpeg reduction that keeps every crop (`min_crop_side` source pixels; None = the
    whole image) at least `size` pixels wide. Smaller images decode at full size, so their output
    bytes are what they were before large images were reduced."""
    def pick(width: int, height: int) -> int:
        if width * height <= REDUCE_ABOVE_PIXELS:
            return 1
        return reduction_for(max(width, height) if min_crop_side is None else min_crop_side, size)
    return pick


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8 HxWx3 RGB or HxW grey, possibly reduced
    scale: float  # image px per source px
    width: int  # source size (the header's; the decoded size when the header could not be read)
    height: int


def read_image(path: str | Path, channels: int = 3, reduce=1, *, max_pixels: int = 0,
               root: str | Path | None = None) -> Decoded:
    """Read an image file as uint8 RGB (channels=3) or grey (channels=1), optionally reduced.

    Checks before any pixel is decoded, each an ImageError whose reason is the skip reason:
    `root` given: the path (symlinks followed) must lie inside it ("path outside root", the file is
    never opened); an empty file ("empty image"); the header's width x height above `max_pixels`
    ("image too large": a decompression bomb never allocates). Then "truncated image" /
    "undecodable image". `reduce`: 1, 2, 4, 8 (libjpeg DCT scaling), or a function (width, height)
    -> factor called with the header's size, applied to JPEGs only (OpenCV decodes other formats
    at full size and shrinks, which saves nothing).

    Grey, RGBA, 16-bit and palette files are converted (OpenCV's IMREAD_COLOR/GRAYSCALE do it:
    alpha dropped, 16-bit scaled to 8)."""
    path = Path(path)
    if root is not None and not resolves_inside(path, root):
        raise ImageError("path outside root", f"{path} resolves outside {root} (--allow-outside-root reads it)")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError("missing image", str(path)) from None
    except OSError as e:
        raise ImageError("unreadable image", f"{path} ({e.strerror or e})") from None
    except ValueError as e:  # a NUL byte or an unencodable character in the name
        raise ImageError("unreadable image", f"{path!r} ({e})") from None
    if not data:
        raise ImageError("empty image", str(path))
    try:
        size = image_size(data)
    except HeaderTooLarge as e:
        if max_pixels and (e.pixels == 0 or e.pixels > max_pixels):
            raise ImageError("image too large", f"{path}: {e.pixels} pixels, more than --max-pixels {max_pixels}") from None
        size = None
    if size is not None and max_pixels and size[0] * size[1] > max_pixels:
        raise ImageError("image too large", f"{path}: {size[0]}x{size[1]} pixels, more than --max-pixels {max_pixels}")
    if callable(reduce):
        reduce = reduce(*size) if size is not None and data[:2] == b"\xff\xd8" else 1
    if _looks_truncated(data):
        raise ImageError("truncated image", str(path))
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[(channels, reduce)])
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        raise ImageError("undecodable image", str(path))
    if size is None and max_pixels and img.shape[0] * img.shape[1] * reduce * reduce > max_pixels:
        raise ImageError("image too large", f"{path}: {img.shape[1]}x{img.shape[0]} pixels decoded, "
                                            f"more than --max-pixels {max_pixels}")
    if channels == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)  # in place: no second full-size copy
    width, height = size if size is not None else (img.shape[1] * reduce, img.shape[0] * reduce)
    return Decoded(img, 1.0 / reduce, width, height)


def decode_image(path: str | Path, channels: int = 3, reduce=1, *, max_pixels: int = 0,
                 root: str | Path | None = None) -> tuple[np.ndarray, float]:
    """(pixels, scale) of `read_image` (image px = source px * scale); raises ImageError naming the problem."""
    d = read_image(path, channels, reduce, max_pixels=max_pixels, root=root)
    return d.pixels, d.scale


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
