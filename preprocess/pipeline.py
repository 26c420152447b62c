"""RawSample -> shard sample: crop + resize, saliency at the output size, encode.

Shared by every source. Saliency is rendered directly at the output resolution (shapes are mapped
through the same `Crop` as the image and rasterized there), which is what makes building cheap:
nothing is rasterized or blurred at full source resolution.

Saliency kinds (`--saliency`):
  mask        union of the objects' finest geometry (polygon / RLE / mask; box where that is all)
  box         union of the objects' boxes (the paper's "coarser map")
  foreground  threshold of the output image against its border colour (plain-background data)
  foreground-box  the foreground's bounding box, filled (the coarser map of plain-background data)
  none        s = 0 everywhere (grey 128): SAT degenerates to noise training, a control
  auto        the best the source has: mask, else box, else foreground (resolved before building,
              by Source.resolve_saliency)

Each sample's json records the kind its map really shows under "saliency" (`kind_used`): a `mask`
build draws an object without finer geometry as its box, so such a sample says `box` (`mixed` when
some of its objects had masks and some did not). The manifest counts samples per kind.
"""
from __future__ import annotations

import json

import cv2
import numpy as np
from kernels.raster import polygon_rings, rasterize_boxes, rasterize_polygons
from kernels.rle import rle_to_mask
from kernels.saliency import foreground_mask, mask_to_saliency_u8

from shards.format import encode_label, sanitize_key
from preprocess.geometry import Crop
from preprocess.sources.base import RawSample, Shape


SMALL_MAP_PIXELS = 900  # uncompressed PNG (pixels + a filter byte per row + ~70 header bytes) fits 2 tar blocks
_SMALL_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 0]


def _shape_mask(shape: Shape, crop: Crop, use_box: bool) -> np.ndarray:
    """uint8 {0,1} (or float [0,1] for soft masks) size x size for one object, in output pixels."""
    size = crop.size
    if use_box or not shape.has_mask:
        return rasterize_boxes(np.array([crop.box_to_output(shape.box)], np.float64), size, size)
    if shape.polygons is not None:
        # rings as (n, 2) float arrays in one block; the rasterizer itself ignores rings with < 3
        # points or NaNs, so no per-ring Python validation here (it is the hot loop of a build)
        try:
            rings = [np.asarray(r, np.float64).reshape(-1, 2) for r in shape.polygons]
        except ValueError:  # an odd number of coordinates somewhere: the careful path drops that ring
            xy, ring_starts = polygon_rings(shape.polygons)[:2]
        else:
            ring_starts = np.zeros(len(rings) + 1, np.int64)
            np.cumsum([len(r) for r in rings], out=ring_starts[1:])
            xy = np.concatenate(rings) if rings else np.zeros((0, 2))
        xy = crop.to_output(xy)
        ring_object = np.zeros(len(ring_starts) - 1, np.int64)
        return rasterize_polygons(xy, ring_starts, ring_object, size, size)
    if shape.rle is not None:
        return rle_to_mask(shape.rle, crop.source_xyxy, size, size)
    # a dense mask over the full source image (scale 1): the same window, averaged when shrinking
    x0, y0, x1, _ = crop.source_xyxy
    m = shape.mask if shape.mask.dtype == np.float32 else shape.mask.astype(np.float32)
    return Crop.make((x0, y0, x1 - x0), 1.0, size).apply(m)


def _filled_bounding_box(mask: np.ndarray) -> np.ndarray:
    """{0,1} mask -> its bounding box filled with 1 (an empty mask stays empty)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = np.zeros_like(mask)
    if len(rows):
        box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = 1
    return box


def render_saliency(raw: RawSample, crop: Crop, image_out: np.ndarray, kind: str, cfg) -> np.ndarray:
    """uint8 size x size saliency (round((s+1)*127.5)) for one sample."""
    size = crop.size
    if kind == "none":
        return np.full((size, size), 128, np.uint8)  # s = 0
    if kind in ("foreground", "foreground-box"):
        mask = foreground_mask(image_out, cfg.foreground_threshold)
        if kind == "foreground-box":
            mask = _filled_bounding_box(mask)
    else:
        if not raw.shapes:  # an unannotated sample of an annotated set: nothing is salient
            mask = np.zeros((size, size), np.uint8)
        else:
            masks = [_shape_mask(s, crop, use_box=(kind == "box")) for s in raw.shapes]
            mask = masks[0] if len(masks) == 1 else np.maximum.reduce(
                [m.astype(np.float32) for m in masks] if any(m.dtype != np.uint8 for m in masks) else masks)
    return mask_to_saliency_u8(mask, cfg.sigma_frac)


def encode_image(img: np.ndarray, fmt: str, quality: int) -> bytes:
    if fmt == "raw":
        return np.ascontiguousarray(img).tobytes()
    bgr = img[..., ::-1] if img.ndim == 3 else img  # OpenCV writes BGR
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buf = cv2.imencode("." + fmt, np.ascontiguousarray(bgr), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {fmt} image")
    return buf.tobytes()


def kind_used(raw: RawSample, kind: str) -> str:
    """The saliency kind a sample's map really shows (see the module docstring)."""
    if kind != "mask" or not raw.shapes:
        return kind  # (a sample without objects: the requested kind, with nothing salient)
    with_mask = sum(s.has_mask for s in raw.shapes)
    return "mask" if with_mask == len(raw.shapes) else "box" if with_mask == 0 else "mixed"


def make_sample(raw: RawSample, kind: str, cfg) -> dict:
    """The shard sample {__key__, jpg|png|raw, sal.png, label.i64, cls, json} for one RawSample."""
    size = cfg.size
    h, w = raw.image.shape[:2]
    crop = Crop.make(raw.window, raw.scale, size) if raw.window is not None else Crop.whole(h, w, raw.scale, size)
    image_out = crop.apply(raw.image)
    sal = render_saliency(raw, crop, image_out, kind, cfg)
    # Tiny maps (Fashion-MNIST's 28x28) are stored uncompressed: deflate took 2.6x longer and saved
    # nothing, since the compressed map still spilled into a second 512-byte tar block for 82% of
    # samples. Larger maps keep OpenCV's default compression, where it does save blocks.
    ok, sal_png = cv2.imencode(".png", sal, _SMALL_PNG if sal.size <= SMALL_MAP_PIXELS else [])
    if not ok:
        raise ValueError("OpenCV could not encode the saliency png")
    meta = dict(raw.meta)
    meta.setdefault("source_id", raw.key)
    meta["label"] = int(raw.label)
    # boxes in output pixels as [x, y, w, h] (clipped to the output), as the shard format says
    boxes = []
    for s in raw.shapes:
        x0, y0, x1, y1 = crop.box_to_output(s.box)
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(size), x1), min(float(size), y1)
        if x1 > x0 and y1 > y0:
            boxes.append([round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)])
    meta["boxes"] = boxes
    meta["saliency"] = kind_used(raw, kind)
    return {
        "__key__": sanitize_key(raw.key),
        cfg.image_format: encode_image(image_out, cfg.image_format, cfg.jpeg_quality),
        "sal.png": sal_png.tobytes(),
        "label.i64": encode_label(raw.label),
        "cls": str(int(raw.label)).encode(),
        "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
    }


def warm_up() -> None:
    """Render one tiny synthetic sample per saliency path (polygon, box, RLE, soft mask, foreground).

    The first call of each Numba kernel loads its cached machine code, and pycocotools and the codecs
    initialise: ~0.35 s in a fresh process. The build's forkserver runs this once before it forks the
    workers (preprocess/forkserver_preload.py), so every worker starts warm instead of paying it in
    its first shard while the other worker waits for nothing."""
    from preprocess.config import BuildConfig

    img = np.zeros((48, 64, 3), np.uint8)
    img[10:30, 20:40] = 200
    rle = {"size": [48, 64], "counts": [10 * 48 + 10, 20, 48 * 64 - 10 * 48 - 30]}
    soft = np.zeros((48, 64), np.float32)
    soft[20:30, 30:50] = 0.5  # a dense soft mask (mask folders: "unknown" trimap pixels)
    shapes = [Shape(box=(8.0, 8.0, 40.0, 36.0), polygons=[[8, 8, 40, 10, 36, 36, 10, 30]]),
              Shape(box=(0.0, 10.0, 1.0, 30.0), rle=rle), Shape(box=(30.0, 20.0, 50.0, 30.0), mask=soft)]
    raw = RawSample(key="warm-up", image=img, label=0, shapes=shapes, window=(4, 2, 44))
    for fmt, kind in (("jpg", "mask"), ("png", "box"), ("raw", "foreground")):
        make_sample(raw, kind, BuildConfig(source="coco", size=16, image_format=fmt, sigma_frac=0.05))
    cv2.imdecode(cv2.imencode(".jpg", img)[1], cv2.IMREAD_REDUCED_COLOR_2)
