"""Object masks at the OUTPUT resolution: polygons and boxes (Numba scanline fill); COCO RLE is kernels.rle.

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

