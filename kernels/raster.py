"""Object masks at the OUTPUT resolution: polygons and boxes (Numba scanline fill), COCO RLE (pycocotools).

Pixel convention = pycocotools' (`frPyObjects` + `decode`, i.e. COCO's `annToMask`): pixel (r, c)
covers [c, c+1) x [r, r+1) and is set when its centre lies inside the outline (up to a 1/5-pixel
rounding). pycocotools gets there by a scheme of its own (`rleFrPoly` in `common/maskApi.c`): vertices rounded onto a 1/5-pixel grid,
the outline walked point by point on that grid, every crossing of a column's centre line turned into a
"toggle from this row on". We replay exactly that walk (same integer rounding, same tie rules), but
write the toggles into an (H+1, W) grid and fill by a running XOR down each column instead of building
an RLE. A polygon rasterized at the output size therefore matches `annToMask` of the same polygon at
that size pixel for pixel; the only difference is the hole rule:

* pycocotools: one RLE per ring, `annToMask` takes the union (a ring inside another does NOT cut a hole);
* here: the toggles of all rings of one object are XORed (even-odd rule, holes work), objects are unioned.

Rings with < 3 points or a non-finite coordinate are ignored (`polygon_rings` reports them). Rings
reaching more than an image size outside are first clipped to a guard rectangle (Sutherland-Hodgman)
so the walk's cost stays bounded by the image size; inside the image this changes nothing visible.

Run the tests: `python -m pytest -q tests/kernels/test_raster.py`
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

_SCALE = 5  # pycocotools' upsampling factor in rleFrPoly


# ----------------------------------------------------------------------------- the pycocotools walk

@njit(cache=True)
def _walk_ring(px, py, n, height, width, tog):
    """XOR the column-crossing toggles of one closed ring (n vertices) into tog (H+1, W) uint8.

    A transcription of rleFrPoly's two first stages; `(pu, pv)` is the previous upsampled point, which
    replaces its u/v arrays (the point list is only ever read pairwise in order)."""
    s5 = float(_SCALE)
    have_prev = False
    pu = pv = 0
    for j in range(n):
        k = j + 1 if j + 1 < n else 0
        # C's (int)(x + .5) truncates toward zero; numba's int() does the same
        xs, ys = int(s5 * px[j] + 0.5), int(s5 * py[j] + 0.5)
        xe, ye = int(s5 * px[k] + 0.5), int(s5 * py[k] + 0.5)
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe = xe, xs
            ys, ye = ye, ys
        if dx >= dy:
            s = (ye - ys) / dx if dx > 0 else 0.0
            steps = dx
        else:
            s = (xe - xs) / dy
            steps = dy
        for d in range(steps + 1):
            t = steps - d if flip else d
            if dx >= dy:
                cu = t + xs
                cv = int(ys + s * t + 0.5)
            else:
                cv = t + ys
                cu = int(xs + s * t + 0.5)
            if have_prev and cu != pu:
                # a crossing of the centre line of output column xd (kept only when it is one)
                xd = ((cu if cu < pu else cu - 1) + 0.5) / s5 - 0.5
                if math.floor(xd) == xd and xd >= 0 and xd <= width - 1:
                    yd = ((cv if cv < pv else pv) + 0.5) / s5 - 0.5
                    if yd < 0:
                        yd = 0.0
                    elif yd > height:
                        yd = float(height)
                    tog[int(math.ceil(yd)), int(xd)] ^= 1
            pu, pv = cu, cv
            have_prev = True


@njit(cache=True)
def _clip_half(sx, sy, n, dx, dy, axis, bound, keep_below):
    """One Sutherland-Hodgman pass: keep the part of ring (sx, sy)[:n] on one side of an axis line."""
    m = 0
    for i in range(n):
        j = i + 1 if i + 1 < n else 0
        ai = sx[i] if axis == 0 else sy[i]
        aj = sx[j] if axis == 0 else sy[j]
        in_i = ai <= bound if keep_below else ai >= bound
        in_j = aj <= bound if keep_below else aj >= bound
        if in_i:
            dx[m], dy[m] = sx[i], sy[i]
            m += 1
        if in_i != in_j:
            f = (bound - ai) / (aj - ai)
            dx[m], dy[m] = sx[i] + f * (sx[j] - sx[i]), sy[i] + f * (sy[j] - sy[i])
            m += 1
    return m


@njit(cache=True)
def _add_ring(xy, a, b, height, width, tog, bx0, by0, bx1, by1):
    """Walk ring xy[a:b] into tog; ignore it when short or non-finite; clip it first when huge."""
    n = b - a
    if n < 3:
        return
    far = False
    for i in range(a, b):
        x, y = xy[i, 0], xy[i, 1]
        if not (math.isfinite(x) and math.isfinite(y)):
            return
        if x < bx0 or x > bx1 or y < by0 or y > by1:
            far = True
    if not far:
        _walk_ring(xy[a:b, 0], xy[a:b, 1], n, height, width, tog)
        return
    # a pass at most doubles the vertex count (one crossing per edge): room for all four passes
    cap = 16 * n + 8
    ax, ay, bx, by = np.empty(cap), np.empty(cap), np.empty(cap), np.empty(cap)
    ax[:n], ay[:n] = xy[a:b, 0], xy[a:b, 1]
    m = _clip_half(ax, ay, n, bx, by, 0, bx0, False)
    m = _clip_half(bx, by, m, ax, ay, 0, bx1, True)
    m = _clip_half(ax, ay, m, bx, by, 1, by0, False)
    m = _clip_half(bx, by, m, ax, ay, 1, by1, True)
    if m >= 3:
        _walk_ring(ax, ay, m, height, width, tog)


@njit(cache=True)
def _fill_or(tog, out):
    """Running XOR of toggles down each column, ORed into out (one object's even-odd fill)."""
    height, width = out.shape
    par = np.zeros(width, np.uint8)
    for y in range(height):
        for x in range(width):
            par[x] ^= tog[y, x]
            out[y, x] |= par[x]


@njit(cache=True)
def _rasterize_polygons(xy, ring_starts, ring_object, out):
    """Returns False (out untouched) when ring_starts is not a rising 0..V offset list."""
    height, width = out.shape
    n_rings = ring_starts.shape[0] - 1
    # validated here, not in the wrapper: numpy's diff/any cost more than the whole fill
    if ring_starts[0] != 0 or ring_starts[n_rings] != xy.shape[0]:
        return False
    for r in range(n_rings):
        if ring_starts[r + 1] < ring_starts[r]:
            return False
    out[:] = 0
    if n_rings <= 0:
        return True
    guard = float(max(height, width)) + 8.0
    bx0, by0, bx1, by1 = -guard, -guard, width + guard, height + guard
    tog = np.empty((height + 1, width), np.uint8)
    order = np.argsort(ring_object, kind="mergesort")
    i = 0
    while i < n_rings:
        obj = ring_object[order[i]]
        tog[:] = 0
        while i < n_rings and ring_object[order[i]] == obj:
            r = order[i]
            _add_ring(xy, ring_starts[r], ring_starts[r + 1], height, width, tog, bx0, by0, bx1, by1)
            i += 1
        _fill_or(tog, out)
    return True


@njit(cache=True)
def _rasterize_boxes(boxes, out):
    height, width = out.shape
    out[:] = 0
    tog = np.empty((height + 1, width), np.uint8)
    quad = np.empty((4, 2))
    for i in range(boxes.shape[0]):
        x0, y0 = max(boxes[i, 0], 0.0), max(boxes[i, 1], 0.0)
        x1, y1 = min(boxes[i, 2], float(width)), min(boxes[i, 3], float(height))
        # NaN fails every comparison, so `not (a < b)` also drops NaN boxes
        if not (x0 < x1 and y0 < y1):
            continue
        # rleFrBbox's vertex order
        quad[0, 0], quad[0, 1] = x0, y0
        quad[1, 0], quad[1, 1] = x0, y1
        quad[2, 0], quad[2, 1] = x1, y1
        quad[3, 0], quad[3, 1] = x1, y0
        tog[:] = 0
        _walk_ring(quad[:, 0], quad[:, 1], 4, height, width, tog)
        _fill_or(tog, out)
    return out


# ----------------------------------------------------------------------------- public API

def _check_size(height, width):
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    return height, width


def _out_array(out, height, width):
    if out is None:
        return np.empty((height, width), np.uint8)
    if out.shape != (height, width) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous uint8 array of shape {(height, width)}, "
                         f"got {out.dtype} {out.shape}")
    return out


def rasterize_polygons(xy, ring_starts, ring_object, height: int, width: int, out=None) -> np.ndarray:
    """Fill polygons into a uint8 (height, width) mask in {0, 1}.

    xy: float (V, 2) vertices x, y already in output pixel coordinates (x_out = (x - x0) * sx);
    ring_starts: int (R+1,) offsets into xy (ring r = xy[ring_starts[r]:ring_starts[r+1]]);
    ring_object: int (R,) object id of each ring. Even-odd within an object, union across objects.
    Rings with < 3 points or a NaN/inf coordinate are ignored. `out` (uint8, C order) is reused if given.
    """
    height, width = _check_size(height, width)
    xy = np.ascontiguousarray(xy, dtype=np.float64).reshape(-1, 2)
    ring_starts = np.ascontiguousarray(ring_starts, dtype=np.int64).reshape(-1)
    ring_object = np.ascontiguousarray(ring_object, dtype=np.int64).reshape(-1)
    if ring_starts.size == 0:
        ring_starts = np.zeros(1, np.int64)
    if ring_object.shape[0] != ring_starts.shape[0] - 1:
        raise ValueError(f"ring_object has {ring_object.shape[0]} entries for {ring_starts.shape[0] - 1} rings")
    out = _out_array(out, height, width)
    if not _rasterize_polygons(xy, ring_starts, ring_object, out):
        raise ValueError(f"ring_starts must rise from 0 to the number of vertices ({xy.shape[0]})")
    return out


def rasterize_boxes(boxes, height: int, width: int, out=None) -> np.ndarray:
    """Union of boxes (B, 4) as x0, y0, x1, y1 in output pixel coordinates -> uint8 (H, W) in {0, 1}.

    Boxes are clipped to the image; empty or NaN boxes are ignored. A box is rasterized exactly as
    pycocotools rasterizes a bbox (the 4-point polygon), so it matches `frPyObjects([x, y, w, h])`."""
    height, width = _check_size(height, width)
    boxes = np.ascontiguousarray(boxes, dtype=np.float64).reshape(-1, 4)
    return _rasterize_boxes(boxes, _out_array(out, height, width))


def polygon_rings(segmentation) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """COCO polygon segmentation [[x1, y1, x2, y2, ...], ...] -> (xy (V, 2) float64, ring_starts (R+1,) int64, bad).

    Only usable rings are returned; `bad` lists (ring index in the input, reason) for the others
    (fewer than 3 points, odd number of coordinates, non-finite or non-numeric coordinates)."""
    rings: list[np.ndarray] = []
    bad: list[tuple[int, str]] = []
    for i, ring in enumerate(segmentation or []):
        try:
            a = np.asarray(ring, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            bad.append((i, "non-numeric coordinates"))
            continue
        if a.size % 2:
            bad.append((i, "odd number of coordinates"))
        elif a.size < 6:
            bad.append((i, "fewer than 3 points"))
        elif not np.all(np.isfinite(a)):
            bad.append((i, "non-finite coordinate"))
        else:
            rings.append(a.reshape(-1, 2))
    starts = np.concatenate([np.zeros(1, np.int64), np.cumsum([len(r) for r in rings], dtype=np.int64)])
    return (np.concatenate(rings) if rings else np.zeros((0, 2))), starts, bad


def pack_objects(objects) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[(xy, ring_starts), ...] one per object (as from polygon_rings) -> (xy, ring_starts, ring_object)
    for rasterize_polygons; object ids are the list positions."""
    xys, starts, owners, base = [np.zeros((0, 2))], [np.zeros(1, np.int64)], [np.zeros(0, np.int64)], 0
    for obj, (xy, rs) in enumerate(objects):
        xys.append(np.asarray(xy, np.float64).reshape(-1, 2))
        rs = np.asarray(rs, np.int64)
        starts.append(rs[1:] + base)
        owners.append(np.full(len(rs) - 1, obj, np.int64))
        base += xys[-1].shape[0]
    return np.concatenate(xys), np.concatenate(starts), np.concatenate(owners)


# ----------------------------------------------------------------------------- RLE

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
