"""kernels.raster against pycocotools (frPyObjects + decode = COCO's annToMask) at output sizes 32/64/128.

Polygons and boxes are rasterized by replaying pycocotools' own boundary walk, so where the hole rule
agrees (single rings, disjoint rings, unions of objects) the masks must be identical; the acceptance
bound (IoU >= 0.98 per object) is checked as well. RLEs are decoded at full resolution and cropped +
area-resized, so they are compared with annToMask + crop + cv2.resize(INTER_AREA) (and, more loosely,
with the same polygon rasterized directly at the output size)."""
import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from kernels.raster import pack_objects, polygon_rings, rasterize_boxes, rasterize_polygons
from kernels.rle import rle_to_mask

SIZES = (32, 64, 128)
# pycocotools 2.0.11 under numpy 2 warns on every decode; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def star(rng, cx, cy, radius, n, ordered=True):
    """Random polygon around (cx, cy): star-shaped when ordered, self-intersecting otherwise."""
    ang = rng.uniform(0, 2 * np.pi, n)
    if ordered:
        ang = np.sort(ang)
    r = radius * rng.uniform(0.45, 1.0, n)
    return np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1)


def coco_poly(rings, size):
    """pycocotools' mask of an object given as rings (union of rings, as annToMask)."""
    rles = mask_utils.frPyObjects([r.ravel().tolist() for r in rings], size, size)
    return mask_utils.decode(mask_utils.merge(rles))


def random_object(rng, size):
    # reasonably sized (radius 12-45% of the image) so IoU measures the boundary, not a few pixels;
    # centres may sit near the edge so some objects are cut by the image border
    return star(rng, rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size,
                rng.uniform(0.12, 0.45) * size, int(rng.integers(20, 41)), ordered=rng.random() < 0.8)


@pytest.mark.parametrize("size", SIZES)
def test_single_polygons_match_pycocotools(size):
    rng = np.random.default_rng(size)
    ious = []
    for _ in range(150):
        p = random_object(rng, size)
        ours = rasterize_polygons(p, [0, len(p)], [0], size, size)
        ref = coco_poly([p], size)
        assert ours.dtype == np.uint8 and ours.shape == (size, size) and set(np.unique(ours)) <= {0, 1}
        ious.append(iou(ours, ref))
        # the walk is pycocotools' own: identical, not just close
        np.testing.assert_array_equal(ours, ref)
    assert min(ious) >= 0.98


@pytest.mark.parametrize("size", SIZES)
def test_several_objects_union_matches_pycocotools(size):
    rng = np.random.default_rng(100 + size)
    out = np.empty((size, size), np.uint8)  # reused buffer, as a builder would
    for _ in range(40):
        objects = [[random_object(rng, size)] for _ in range(int(rng.integers(2, 8)))]
        # an object made of two disjoint rings: union and even-odd agree
        a = star(rng, 0.25 * size, 0.25 * size, 0.15 * size, 24)
        b = star(rng, 0.75 * size, 0.75 * size, 0.15 * size, 24)
        objects.append([a, b])
        packed = pack_objects([(np.concatenate(rs), np.cumsum([0] + [len(r) for r in rs])) for rs in objects])
        got = rasterize_polygons(*packed, size, size, out=out)
        assert got is out
        ref = np.zeros((size, size), np.uint8)
        for rings in objects:
            ref |= coco_poly(rings, size)
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("size", SIZES)
def test_holes_follow_even_odd_within_an_object(size):
    rng = np.random.default_rng(200 + size)
    c = size / 2
    for _ in range(20):
        outer = star(rng, c, c, 0.45 * size, 30)
        hole = star(rng, c, c, 0.15 * size, 20)  # radius <= 0.15 < 0.45 * 0.45: strictly inside the outer ring
        ours = rasterize_polygons(np.concatenate([outer, hole]), [0, 30, 50], [0, 0], size, size)
        ring_masks = [coco_poly([r], size) for r in (outer, hole)]
        # even-odd = XOR of the rings; pycocotools' union of rings fills the hole instead
        np.testing.assert_array_equal(ours, ring_masks[0] ^ ring_masks[1])
        assert ring_masks[1].sum() > 0 and not np.any(ours[ring_masks[1] == 1])
        # the same two rings as two objects: union, hole filled (matches annToMask's union)
        two = rasterize_polygons(np.concatenate([outer, hole]), [0, 30, 50], [5, 9], size, size)
        np.testing.assert_array_equal(two, coco_poly([outer, hole], size))


@pytest.mark.parametrize("size", SIZES)
def test_boxes_match_pycocotools_bbox(size):
    rng = np.random.default_rng(300 + size)
    for _ in range(100):
        n = int(rng.integers(1, 5))
        xy0 = rng.uniform(-0.3, 0.9, (n, 2)) * size
        wh = rng.uniform(0.05, 0.6, (n, 2)) * size
        boxes = np.concatenate([xy0, xy0 + wh], 1)  # some reach outside: clipped
        ours = rasterize_boxes(boxes, size, size)
        ref = np.zeros((size, size), np.uint8)
        for x0, y0, x1, y1 in boxes:
            ref |= mask_utils.decode(mask_utils.frPyObjects(np.array([[x0, y0, x1 - x0, y1 - y0]]), size, size))[:, :, 0]
        np.testing.assert_array_equal(ours, ref)
        # a box is the 4-point polygon
        corners = [np.array([[x0, y0], [x0, y1], [x1, y1], [x1, y0]]) for x0, y0, x1, y1 in boxes]
        packed = pack_objects([(c, [0, 4]) for c in corners])
        np.testing.assert_array_equal(rasterize_polygons(*packed, size, size), ours)


def uncompressed(mask):
    """COCO uncompressed RLE of a (h, w) mask: column-major run lengths starting with zeros."""
    flat = np.asarray(mask, np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


@pytest.mark.parametrize("size", SIZES)
def test_rle_matches_anntomask_crop_resize(size):
    """Reference = COCO's path: annToMask at full resolution, crop, cv2.resize INTER_AREA, >= 0.5."""
    rng = np.random.default_rng(400 + size)
    h, w = 480, 640
    ious_cv, ious_poly = [], []
    for _ in range(20):
        # objects large enough that every output size is a downscale, as for 640x480 sources
        p = star(rng, rng.uniform(150, 490), rng.uniform(150, 330), rng.uniform(70, 150), int(rng.integers(20, 41)))
        compressed = mask_utils.frPyObjects([p.ravel().tolist()], h, w)[0]
        full = mask_utils.decode(compressed)
        plain = uncompressed(full)
        # square crop around the object's box with a margin; sometimes partly outside the image
        x0, y0 = (int(v) for v in np.floor(p.min(0)) - 12)
        side = int(np.ceil(max(*(p.max(0) - p.min(0))))) + 24
        crop = (x0, y0, x0 + side, y0 + side)
        padded = np.zeros((h + 2 * side, w + 2 * side), np.float32)
        padded[side:side + h, side:side + w] = full
        cut = padded[y0 + side:y0 + 2 * side, x0 + side:x0 + 2 * side]
        ref_cv = (cv2.resize(cut, (size, size), interpolation=cv2.INTER_AREA) >= 0.5).astype(np.uint8)
        ref_poly = coco_poly([(p - [x0, y0]) * (size / side)], size)
        got = rle_to_mask(compressed, crop, size, size)
        assert got.shape == (size, size) and got.dtype == np.uint8
        np.testing.assert_array_equal(rle_to_mask(plain, crop, size, size), got)
        as_json = {"size": compressed["size"], "counts": compressed["counts"].decode()}  # str, as in COCO files
        np.testing.assert_array_equal(rle_to_mask(as_json, crop, size, size), got)
        ious_cv.append(iou(got, ref_cv))
        # the polygon path samples pixel centres, the RLE path area coverage: close, not identical
        ious_poly.append(iou(got, ref_poly))
        # nearest mode: the full-res pixel under each output pixel's centre
        centres = np.floor(x0 + (np.arange(size) + 0.5) * side / size).astype(int), \
            np.floor(y0 + (np.arange(size) + 0.5) * side / size).astype(int)
        cx, cy = np.meshgrid(*centres)
        ok = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
        want = np.where(ok, full[np.clip(cy, 0, h - 1), np.clip(cx, 0, w - 1)], 0)
        np.testing.assert_array_equal(rle_to_mask(plain, crop, size, size, mode="nearest"), want)
    assert min(ious_cv) >= 0.98, sorted(ious_cv)[:5]
    assert min(ious_poly) >= 0.95 and np.mean(ious_poly) >= 0.975, sorted(ious_poly)[:5]


def test_rle_area_mode_keeps_coverage_rule():
    # a 4x4-pixel square at (8..12) in a 40x40 image, crop of the whole image to 10x10: each output
    # pixel covers 4x4 source pixels, so exactly output pixel (2, 2) is fully covered
    m = np.zeros((40, 40), np.uint8)
    m[8:12, 8:12] = 1
    got = rle_to_mask(uncompressed(m), (0, 0, 40, 40), 10, 10)
    assert got.sum() == 1 and got[2, 2] == 1
    # shifted by 2 px each output pixel gets a quarter: gone at 0.5, kept at 0.25
    m2 = np.zeros((40, 40), np.uint8)
    m2[10:14, 10:14] = 1
    assert rle_to_mask(uncompressed(m2), (0, 0, 40, 40), 10, 10).sum() == 0
    assert rle_to_mask(uncompressed(m2), (0, 0, 40, 40), 10, 10, min_coverage=0.25).sum() == 4
    # crop entirely outside the image: empty
    assert rle_to_mask(uncompressed(m), (100, 100, 140, 140), 8, 8).sum() == 0


# ----------------------------------------------------------------------------- bad input

def test_empty_input_gives_all_zeros():
    xy, starts, bad = polygon_rings([])
    assert xy.shape == (0, 2) and list(starts) == [0] and bad == []
    assert rasterize_polygons(xy, starts, np.zeros(0, np.int64), 32, 32).sum() == 0
    assert rasterize_polygons(np.zeros((0, 2)), [], [], 16, 16).sum() == 0
    assert rasterize_boxes(np.zeros((0, 4)), 32, 32).sum() == 0


def test_short_odd_and_nan_rings_are_reported_and_ignored():
    good = [4, 4, 28, 6, 26, 27, 6, 24]
    seg = [good, [1, 1, 5, 5], [3, 3, 9, 9, 1], [2, 2, float("nan"), 8, 9, 9], ["a", 1, 2, 3, 4, 5], [9, 9]]
    xy, starts, bad = polygon_rings(seg)
    assert list(starts) == [0, 4]
    assert dict(bad) == {1: "fewer than 3 points", 2: "odd number of coordinates", 3: "non-finite coordinate",
                         4: "non-numeric coordinates", 5: "fewer than 3 points"}
    ref = coco_poly([np.array(good, float).reshape(-1, 2)], 32)
    np.testing.assert_array_equal(rasterize_polygons(xy, starts, [0], 32, 32), ref)
    # the kernel itself also ignores NaN and 2-point rings handed to it directly
    nan_ring = np.array([[2, 2], [np.nan, 8], [9, 9]], float)
    two_points = np.array([[0, 0], [30, 30]], float)
    raw = np.concatenate([np.array(good, float).reshape(-1, 2), nan_ring, two_points])
    got = rasterize_polygons(raw, [0, 4, 7, 9], [0, 1, 2], 32, 32)
    np.testing.assert_array_equal(got, ref)


def test_boxes_outside_are_clipped_or_dropped():
    boxes = np.array([[-50, -50, -10, -10],        # wholly outside
                      [40, 0, 60, 10],             # right of a 32-wide image
                      [5, 5, 5, 20],               # zero width
                      [np.nan, 0, 10, 10],         # NaN
                      [20, 25, 10, 30]], float)    # x1 < x0
    assert rasterize_boxes(boxes, 32, 32).sum() == 0
    partly = np.array([[-10.0, 20.0, 8.0, 60.0]])
    got = rasterize_boxes(partly, 32, 32)
    np.testing.assert_array_equal(got, rasterize_boxes(np.array([[0.0, 20.0, 8.0, 32.0]]), 32, 32))
    assert got[20:, :8].all() and got.sum() == 12 * 8


def test_huge_coordinates_are_clipped_not_walked():
    # a ring reaching far outside: clipped to a guard box, result as pycocotools' (which walks it all)
    p = np.array([[-3000.0, 10.0], [25.0, 2.0], [28.0, 30.0], [5000.0, 4000.0]])
    ours = rasterize_polygons(p, [0, 4], [0], 32, 32)
    ref = coco_poly([p], 32)
    assert iou(ours, ref) >= 0.99 and np.sum(ours != ref) <= 2
    # absurd coordinates finish fast and cover the image
    big = np.array([[-1e12, -1e12], [1e12, -1e12], [1e12, 1e12], [-1e12, 1e12]])
    assert rasterize_polygons(big, [0, 4], [0], 16, 16).all()


def test_argument_errors_are_value_errors():
    p = np.array([[1.0, 1.0], [9.0, 1.0], [5.0, 9.0]])
    with pytest.raises(ValueError, match="ring_object"):
        rasterize_polygons(p, [0, 3], [0, 1], 16, 16)
    with pytest.raises(ValueError, match="ring_starts"):
        rasterize_polygons(p, [0, 5], [0], 16, 16)
    with pytest.raises(ValueError, match="out must be"):
        rasterize_polygons(p, [0, 3], [0], 16, 16, out=np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="positive"):
        rasterize_boxes(np.zeros((1, 4)), 0, 16)
    with pytest.raises(ValueError, match="RLE must be a dict"):
        rle_to_mask([1, 2], (0, 0, 4, 4), 4, 4)
    with pytest.raises(ValueError, match="runs cover"):
        rle_to_mask({"size": [4, 4], "counts": [3, 2]}, (0, 0, 4, 4), 4, 4)
    with pytest.raises(ValueError, match="crop"):
        rle_to_mask({"size": [4, 4], "counts": [16]}, (0, 0, 0, 4), 4, 4)
    with pytest.raises(ValueError, match="size"):
        rle_to_mask({"size": "big", "counts": [16]}, (0, 0, 4, 4), 4, 4)
    # compressed strings whose runs do not cover the image (pycocotools would return garbage) or that
    # hold characters outside its alphabet
    for bad in ("0", "", "4", "zzzz", "1\x7f"):
        with pytest.raises(ValueError, match="RLE"):
            rle_to_mask({"size": [4, 4], "counts": bad}, (0, 0, 4, 4), 4, 4)
    good = mask_utils.encode(np.asfortranarray(np.eye(4, dtype=np.uint8)))
    assert rle_to_mask(good, (0, 0, 4, 4), 4, 4).tolist() == np.eye(4, dtype=np.uint8).tolist()
