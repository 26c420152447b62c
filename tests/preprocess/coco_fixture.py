"""A small real COCO dataset on disk for tests: JPEG files + an instances JSON.

Objects are drawn into the pixels (filled polygons in a class colour) so the saliency written to
the shards can be checked against the image content. Annotation kinds: polygons (one with a hole),
compressed RLE, uncompressed RLE, a crowd region. Tests mutate the returned dict to inject bad input.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CATEGORIES = [{"id": 3, "name": "car"}, {"id": 7, "name": "train"}, {"id": 12, "name": "cat"}]
COLOURS = {3: (220, 40, 40), 7: (40, 200, 60), 12: (50, 60, 230)}


def _polygon(rng, cx, cy, r, n):
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.7, 1.0, n)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).round(2)


def _fill(mask, poly, value):
    """Draw a polygon exactly as COCO's annToMask rasterizes it (pycocotools), so the pixels and
    the annotation agree to the pixel."""
    h, w = mask.shape
    inside = mask_utils.decode(mask_utils.frPyObjects([poly.ravel().tolist()], h, w))[..., 0] > 0
    mask[inside] = value


def make_coco(root: Path, num_images: int = 6, objects: int = 3, width: int = 160, height: int = 120,
              seed: int = 0) -> dict:
    """Write root/images/*.jpg and root/ann.json; returns the JSON document (also written)."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        img = np.full((height, width, 3), 20, np.uint8)
        img += rng.integers(0, 20, img.shape, dtype=np.uint8)  # some texture, not flat
        image_id = 100 + i
        for j in range(objects):
            cat = CATEGORIES[(i + j) % len(CATEGORIES)]["id"]
            # objects in separate cells (no overlap), so a crop's colours tell which pixels are salient
            cell = width / objects
            r = rng.uniform(10, min(cell / 2 - 2, height / 2 - 2, 30))
            cx, cy = rng.uniform(j * cell + r + 1, (j + 1) * cell - r - 1), rng.uniform(r + 1, height - r - 1)
            poly = _polygon(rng, cx, cy, r, int(rng.integers(8, 20)))
            mask = np.zeros((height, width), np.uint8)
            _fill(mask, poly, 1)
            kind = (i * objects + j) % 4
            hole = _polygon(rng, cx, cy, r * 0.35, 6) if kind == 3 else None
            if hole is not None:  # a hole: second ring inside (even-odd), background in the pixels too
                _fill(mask, hole, 0)
            img[mask > 0] = COLOURS[cat]
            if kind == 0 or kind == 3:
                seg = [poly.ravel().round(2).tolist()]
                if hole is not None:
                    seg.append(hole.ravel().round(2).tolist())
            else:
                rle = mask_utils.encode(np.asfortranarray(mask))
                if kind == 1:
                    seg = {"size": [height, width], "counts": rle["counts"].decode()}
                else:  # uncompressed RLE: column-major run lengths
                    flat = mask.ravel(order="F")
                    change = np.flatnonzero(np.diff(flat)) + 1
                    runs = np.diff(np.concatenate([[0], change, [flat.size]]))
                    counts = runs.tolist() if flat[0] == 0 else [0] + runs.tolist()
                    seg = {"size": [height, width], "counts": counts}
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                         "segmentation": seg, "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                         "area": float(mask.sum())})
        name = f"img_{i:04d}.jpg"
        cv2.imwrite(str(img_dir / name), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    # one crowd region on the first image (skipped in object unit, part of the union in image unit)
    crowd = np.zeros((height, width), np.uint8)
    crowd[:10, :20] = 1
    rle = mask_utils.encode(np.asfortranarray(crowd))
    anns.append({"id": len(anns) + 1, "image_id": 100, "category_id": 3, "iscrowd": 1,
                 "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                 "bbox": [0.0, 0.0, 20.0, 10.0], "area": 200.0})
    doc = {"images": images, "annotations": anns, "categories": CATEGORIES}
    write_json(root / "ann.json", doc)
    return doc


def write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc))
