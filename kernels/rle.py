"""COCO RLE object masks at the OUTPUT resolution: validate and decode (pycocotools), then crop and
resize to the output pixels by exact area coverage or nearest pixel (Numba).

The area rule at min_coverage 0.5 is the area analogue of kernels.raster's centre rule for polygons,
so RLE and polygon objects of one image look alike. Sizes and `out` arrays are checked as there.

Run the tests: `python -m pytest -q tests/kernels/test_raster.py`
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from kernels.raster import _check_size, _out_array


@njit(cache=True)
def _resample_mask(mask, x0, y0, sx, sy, min_cov, nearest, out):
    """Crop-and-resize of a full-resolution {0,1} mask: output pixel (r, c) looks at the source
    rectangle [x0 + c*sx, x0 + (c+1)*sx) x [y0 + r*sy, ...). Outside the source counts as 0.

    area mode: set when the covered fraction of that rectangle is >= min_cov, computed exactly from a
    summed-area table (bilinear interpolation of a summed-area table of a piecewise-constant image is
    exact). nearest mode: the source pixel under the rectangle's centre."""
    out_h, out_w = out.shape
    h, w = mask.shape
    if nearest:
        for r in range(out_h):
            yy = int(math.floor(y0 + (r + 0.5) * sy))
            for c in range(out_w):
                xx = int(math.floor(x0 + (c + 0.5) * sx))
                out[r, c] = 1 if (0 <= yy < h and 0 <= xx < w and mask[yy, xx] != 0) else 0
        return out
    # summed-area table over the source window the crop touches (not the whole image)
    cx0 = min(max(int(math.floor(x0)), 0), w)
    cy0 = min(max(int(math.floor(y0)), 0), h)
    cx1 = min(max(int(math.ceil(x0 + out_w * sx)), 0), w)
    cy1 = min(max(int(math.ceil(y0 + out_h * sy)), 0), h)
    sat = np.zeros((cy1 - cy0 + 1, cx1 - cx0 + 1))
    for yy in range(cy0, cy1):
        run = 0.0
        for xx in range(cx0, cx1):
            run += 1.0 if mask[yy, xx] != 0 else 0.0
            sat[yy - cy0 + 1, xx - cx0 + 1] = sat[yy - cy0, xx - cx0 + 1] + run
    sh, sw, area = cy1 - cy0, cx1 - cx0, sx * sy
    for r in range(out_h):
        ya = min(max(y0 + r * sy - cy0, 0.0), float(sh))
        yb = min(max(y0 + (r + 1) * sy - cy0, 0.0), float(sh))
        for c in range(out_w):
            xa = min(max(x0 + c * sx - cx0, 0.0), float(sw))
            xb = min(max(x0 + (c + 1) * sx - cx0, 0.0), float(sw))
            inside = (_sat_at(sat, xb, yb) - _sat_at(sat, xa, yb)
                      - _sat_at(sat, xb, ya) + _sat_at(sat, xa, ya))
            out[r, c] = 1 if inside >= min_cov * area - 1e-9 else 0
    return out


@njit(cache=True)
def _sat_at(sat, x, y):
    """Summed-area table at a fractional point (bilinear; x, y already clamped to the table)."""
    sh, sw = sat.shape[0] - 1, sat.shape[1] - 1
    ix = min(int(x), sw - 1) if sw > 0 else 0
    iy = min(int(y), sh - 1) if sh > 0 else 0
    fx, fy = x - ix, y - iy
    ix1, iy1 = min(ix + 1, sw), min(iy + 1, sh)
    top = sat[iy, ix] * (1 - fx) + sat[iy, ix1] * fx
    bot = sat[iy1, ix] * (1 - fx) + sat[iy1, ix1] * fx
    return top * (1 - fy) + bot * fy


def _compressed_counts(counts: bytes) -> list[int]:
    """Run lengths of a COCO compressed RLE string (rleFrString's arithmetic), to validate it first:
    pycocotools decodes runs that do not cover the image silently, leaving the rest uninitialised."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x = k = 0
        more = True
        while more:
            if p >= len(counts):
                raise ValueError("truncated compressed RLE counts")
            c = counts[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {chr(counts[p])!r} in compressed RLE counts")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def rle_to_mask(rle, crop_xyxy, out_h: int, out_w: int, mode: str = "area", min_coverage: float = 0.5,
                out=None) -> np.ndarray:
    """COCO RLE -> uint8 (out_h, out_w) {0, 1} mask of the crop (x0, y0, x1, y1) in source pixels.

    rle: {"size": [h, w], "counts": str|bytes (compressed) or list of ints (uncompressed)}; decoded
    by pycocotools. The crop may reach outside the image (zeros there). mode "area" (default): an
    output pixel is set when at least `min_coverage` of its source area is inside the mask, which at
    0.5 is the area analogue of the polygon path's centre rule (so RLE and polygon objects look
    alike); lower min_coverage keeps thin parts. mode "nearest": the source pixel under the centre.
    Raises ValueError (one line) on a malformed RLE or crop."""
    from pycocotools import mask as mask_utils

    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("RLE must be a dict with 'size' and 'counts'")
    try:
        h, w = (int(v) for v in rle["size"])
    except (TypeError, ValueError):
        raise ValueError(f"RLE size must be [height, width], got {rle['size']!r}") from None
    counts = rle["counts"]
    try:
        if isinstance(counts, (list, tuple)):
            runs = [int(c) for c in counts]
        else:
            raw = counts.encode() if isinstance(counts, str) else bytes(counts)
            runs = _compressed_counts(raw)
        if h < 0 or w < 0 or min(runs, default=0) < 0 or sum(runs) != h * w:
            raise ValueError(f"RLE runs cover {sum(runs)} pixels (or one is negative), not {h}*{w}")
        if isinstance(counts, (list, tuple)):
            full = mask_utils.decode(mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w))
        else:
            full = mask_utils.decode({"size": [h, w], "counts": raw})
    except ValueError:
        raise
    except Exception as e:  # pycocotools raises bare Exceptions/TypeErrors on garbage counts
        raise ValueError(f"undecodable RLE: {e}") from None
    x0, y0, x1, y1 = (float(v) for v in crop_xyxy)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise ValueError(f"crop must be finite x0 < x1, y0 < y1, got {crop_xyxy!r}")
    if mode not in ("area", "nearest"):
        raise ValueError(f"mode must be 'area' or 'nearest', got {mode!r}")
    out_h, out_w = _check_size(out_h, out_w)
    return _resample_mask(full, x0, y0, (x1 - x0) / out_w, (y1 - y0) / out_h, float(min_coverage),
                          mode == "nearest", _out_array(out, out_h, out_w))
