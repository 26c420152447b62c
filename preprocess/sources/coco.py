"""COCO source: instances JSON (boxes, polygons, RLE compressed or not, iscrowd) + an image folder.

    preprocess build-shards coco --annotations annotations/instances_val2017.json \
        --images val2017 --split val --size 64 --out shards/coco/val

Units: `object` (default) = one sample per non-crowd annotation, a square crop around its box with
`--context` margin, saliency = that object's mask; `image` = the whole image (padded to a square),
label = category of the largest object, saliency = union of all objects (crowd regions included).
Category ids map to contiguous indices in id order; names are kept.

Annotation problems are recorded skips (unknown image/category ids, NaN or empty boxes, boxes
wholly outside the image, polygons with < 3 points, an odd coordinate count or non-finite
coordinates, a segmentation of the wrong type, fields of the wrong type); an image record with a
bad size or file name skips its annotations, and a `file_name` that leaves the image folder
(absolute, `..`) is skipped as "path outside root" without being opened. Image problems (missing,
empty, truncated, undecodable, larger than --max-pixels) skip that image's samples at load time.
A category table that cannot be read (ids missing, repeated, of mixed or wrong types) stops the
build: labels would be meaningless.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import orjson

from shards.storage import sha256_file

from preprocess.geometry import ImageError, clip_box, reduction_for, square_window
from preprocess.sources.base import RawSample, Shape, Skip, Source, SourceError, WorkItem


def _valid_rings(segmentation: list) -> tuple[list, str | None]:
    """Keep polygon rings with >= 3 finite points (an even count of numbers); for the others, the
    reason of the first one (None when every ring is good).

    Plain Python on purpose: this runs in the main process for every annotation before any worker
    starts (numpy per ring cost 0.17 s of serial time on 20k objects; this is ~5x cheaper). A ring's
    sum is finite only when every coordinate is a finite number (NaN and inf propagate; a string or
    a nested list raises). Rings stay lists: the worker converts them once, in parallel."""
    good, bad = [], None
    isfinite = math.isfinite
    for ring in segmentation:
        try:
            # (a JSON true/false would pass as 1/0: harmless, and a per-coordinate type check cost
            # 0.5 s of serial planning on 20k objects)
            ok = type(ring) is list and len(ring) >= 6 and len(ring) % 2 == 0 and isfinite(sum(ring))
        except (TypeError, OverflowError):  # not numbers / an integer too large for a float
            ok = False
        if ok:
            good.append(ring)
        elif bad is None:
            bad = _ring_problem(ring)
    return good, bad


def _ring_problem(ring) -> str:
    """The skip reason for a ring `_valid_rings` refused (the slow path: only bad rings get here)."""
    if type(ring) is not list or any(type(v) not in (int, float) for v in ring):
        return "bad segmentation"
    if len(ring) % 2:
        return "odd coordinate count"
    try:
        finite = all(math.isfinite(float(v)) for v in ring)
    except OverflowError:
        finite = False
    if not finite:
        return "non-finite coordinates"
    return "polygon with fewer than 3 points"


ID_TYPES = frozenset((int, str))  # `type(v) in ID_TYPES`: inlined in the per-annotation loop


def _is_id(value) -> bool:
    """COCO ids are integers; strings are accepted too (some exporters write them). Never bool,
    float, list or dict (a list or dict id would not even be hashable)."""
    return type(value) in ID_TYPES


def _number(value) -> float | None:
    """A finite JSON number as float, else None (strings, bools, lists, NaN, inf, huge integers)."""
    if type(value) not in (int, float):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


class CocoSource(Source):
    name = "coco"
    not_pickled = ("_doc",)
    channels = 3
    has_masks = True
    has_boxes = True
    units = ("object", "image")
    item_file_keys = ("image_list_sha256",)

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.annotations:
            raise SourceError("coco: --annotations FILE.json is required")
        self.ann_path = Path(cfg.annotations)
        self.image_dir = Path(cfg.images) if cfg.images else self.ann_path.parent
        if not self.ann_path.is_file():
            raise SourceError(f"{self.ann_path}: annotation file not found")
        if not self.image_dir.is_dir():
            raise SourceError(f"{self.image_dir}: image folder not found")
        # the parsed JSON is kept out of pickles (not_pickled): workers need only the items
        self._doc = self._read(self.ann_path)
        cats = self._doc["categories"]
        for n, c in enumerate(cats):
            if not _is_id(c["id"]):
                raise SourceError(f"{self.ann_path}: categories[{n}]: id {c['id']!r} is not an integer")
        if len({type(c["id"]) for c in cats}) > 1:
            a = next(c["id"] for c in cats if type(c["id"]) is int)
            b = next(c["id"] for c in cats if type(c["id"]) is str)
            raise SourceError(f"{self.ann_path}: categories: ids mix numbers and strings ({a!r} and {b!r})")
        cats = sorted(cats, key=lambda c: c["id"])
        self.cat_index = {c["id"]: i for i, c in enumerate(cats)}
        if len(self.cat_index) != len(cats):
            raise SourceError(f"{self.ann_path}: categories: duplicate ids")
        self._classes = [str(c.get("name", c["id"])) for c in cats]

    @staticmethod
    def _read(path: Path) -> dict:
        data = path.read_bytes()
        try:
            # orjson parses 3x faster (0.12 s vs 0.38 s for the 20k-object benchmark file: the main
            # process's serial part of a parallel build); it refuses what the json module accepts
            # beyond the standard (NaN, Infinity, huge ints), which then goes the slow way
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            try:
                doc = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SourceError(f"{path}: malformed JSON ({e})") from None
        if not isinstance(doc, dict):
            raise SourceError(f"{path}: not a COCO annotation file (top level is not an object)")
        for key in ("images", "annotations", "categories"):
            if not isinstance(doc.get(key), list):
                raise SourceError(f"{path}: not a COCO annotation file (no {key!r} list)")
        for n, c in enumerate(doc["categories"]):
            if not isinstance(c, dict) or "id" not in c:
                raise SourceError(f"{path}: categories[{n}]: a category without an id")
        return doc

    def _images(self) -> dict:
        """id -> image record, for records with a usable id (the last record of a repeated id wins)."""
        out = {}
        for im in self._doc["images"]:
            if isinstance(im, dict) and _is_id(im.get("id")):
                out[im["id"]] = im
        return out

    def _image_problem(self, im: dict) -> str | None:
        """Why an image record cannot be used (the skip reason for each of its annotations), or None."""
        for key in ("width", "height"):
            v = im.get(key)
            if v is None or v == 0:
                return "image without size"
            v = _number(v)
            if v is None:
                return "invalid image size"
            if v <= 0:
                return "image without size"
        return self.path_problem(im.get("file_name"))

    def fingerprint(self) -> dict:
        # names + sizes of every usable image: cheap (stat only) and catches replaced files; names
        # that leave the image folder are never stat'ed (they are skipped, not read)
        h = hashlib.sha256()
        names = [im["file_name"] for im in self._images().values()
                 if im.get("file_name") and self.path_problem(im["file_name"]) is None]
        for name in sorted(names):
            p = self.image_dir / name
            size = p.stat().st_size if p.is_file() else -1
            h.update(f"{name}\t{size}\n".encode("utf-8", "surrogateescape"))
        return {"annotations": self.ann_path.name, "annotations_sha256": sha256_file(self.ann_path),
                "images": len(self._doc["images"]), "image_list_sha256": h.hexdigest()}

    # ------------------------------------------------------------------ planning

    def _object(self, ann: dict, im: dict) -> Shape | str:
        """A Shape for one annotation of a usable image record, or the reason it cannot be one."""
        w, h = float(im["width"]), float(im["height"])
        seg = ann.get("segmentation")
        polygons = rle = None
        if isinstance(seg, list):
            polygons, bad = _valid_rings(seg)
            if not polygons and bad:
                return bad
            polygons = polygons or None
        elif isinstance(seg, dict):
            size = seg.get("size")
            if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int for v in size)
                    and type(seg.get("counts")) in (str, list)):
                return "malformed RLE"
            if (size[0], size[1]) != (int(h), int(w)):
                return "RLE size differs from image size"
            rle = seg
        elif seg is not None:  # a number, a string...: not a COCO segmentation (never a silent box)
            return "bad segmentation"
        bbox = ann.get("bbox")
        if type(bbox) is not list or len(bbox) != 4:
            return "invalid box"
        try:  # `+ 0.0` refuses strings (float("12") would not) and lists, and makes floats
            x, y, bw, bh = bbox[0] + 0.0, bbox[1] + 0.0, bbox[2] + 0.0, bbox[3] + 0.0
        except TypeError:
            return "invalid box"
        except OverflowError:  # an integer too large for a float
            return "NaN or infinite box"
        isfinite = math.isfinite
        if not (isfinite(x) and isfinite(y) and isfinite(bw) and isfinite(bh)):
            return "NaN or infinite box"
        if bw <= 0 or bh <= 0:
            return "zero-area or negative box"
        box = clip_box((x, y, x + bw, y + bh), w, h)
        if box is None:
            return "box outside image"
        if max(box[2] - box[0], box[3] - box[1]) < max(self.cfg.min_box, 1e-6):
            return "box too small"
        return Shape(box=box, polygons=polygons, rle=rle)

    def items(self) -> tuple[list[WorkItem], list[Skip]]:
        images = self._images()
        problems: dict = {}  # image id -> reason its record is unusable (None: usable), checked once
        cat_index = self.cat_index
        skips: list[Skip] = []
        per_image: dict = {}
        for ann in self._doc["annotations"]:
            if not isinstance(ann, dict):
                skips.append(Skip("?", "malformed annotation"))
                continue
            ann_id = ann.get("id", len(per_image))
            aid = f"ann{ann.get('id', '?')}"
            image_id, category_id = ann.get("image_id"), ann.get("category_id")
            if type(ann_id) not in ID_TYPES:
                skips.append(Skip(aid, "invalid annotation id", repr(ann_id)[:100]))
                continue
            if type(image_id) not in ID_TYPES or image_id not in images:
                skips.append(Skip(aid, "unknown image id", repr(image_id)[:100]))
                continue
            if type(category_id) not in ID_TYPES or category_id not in cat_index:
                skips.append(Skip(aid, "unknown category id", repr(category_id)[:100]))
                continue
            crowd = ann.get("iscrowd", 0)
            if type(crowd) not in (int, bool) or crowd not in (0, 1):
                skips.append(Skip(aid, "invalid iscrowd", repr(crowd)[:100]))
                continue
            crowd = bool(crowd)
            if crowd and self.cfg.unit == "object":
                skips.append(Skip(aid, "crowd annotation"))
                continue
            im = images[image_id]
            if image_id not in problems:
                problems[image_id] = self._image_problem(im)
            if problems[image_id] is not None:
                skips.append(Skip(aid, problems[image_id], f"{self.ann_path}: image {image_id!r}"))
                continue
            shape = self._object(ann, im)
            if isinstance(shape, str):
                skips.append(Skip(aid, shape))
                continue
            area = ann.get("area")
            if area is None:
                area = (shape.box[2] - shape.box[0]) * (shape.box[3] - shape.box[1])
            elif not (type(area) is float and 0.0 <= area < math.inf):  # (the common case costs one test)
                area = _number(area)
                if area is None or area < 0:
                    skips.append(Skip(aid, "invalid area", repr(ann.get("area"))[:100]))
                    continue
            per_image.setdefault(image_id, []).append((str(ann_id), cat_index[category_id], shape, crowd, area))
        items = []
        for image_id in sorted(per_image, key=str):
            im, objs = images[image_id], per_image[image_id]
            data = (im["file_name"], int(im["width"]), int(im["height"]), objs)
            if self.cfg.unit == "object":
                items.append(WorkItem(f"img{image_id}", len(objs), data))
            elif any(not crowd for _, _, _, crowd, _ in objs):
                items.append(WorkItem(f"img{image_id}", 1, data))
            else:
                skips.append(Skip(f"img{image_id}", "only crowd annotations", count=1))
        return items, skips

    # ------------------------------------------------------------------ loading

    def item_files(self, item: WorkItem) -> list[Path]:
        return [self.image_dir / item.data[0]]

    def load(self, item: WorkItem):
        file_name, w, h, objs = item.data
        path = self.image_dir / file_name
        size = self.cfg.size
        if self.cfg.unit == "object":
            windows = [square_window(shape.box, self.cfg.context) for _, _, shape, _, _ in objs]
            reduce = reduction_for(min(win[2] for win in windows), size)
        else:
            reduce = reduction_for(max(w, h), size)
        try:
            decoded = self.read_image(path, self.image_dir, reduce)
        except ImageError as e:
            yield Skip(item.id, e.reason, e.detail, item.expected)
            return
        img, scale = decoded.pixels, decoded.scale
        if abs(img.shape[1] - w * scale) > 1 or abs(img.shape[0] - h * scale) > 1:
            yield Skip(item.id, "image size differs from annotation",
                       f"{path}: {img.shape[1] / scale:.0f}x{img.shape[0] / scale:.0f}, json says {w}x{h}",
                       item.expected)
            return
        if self.cfg.unit == "object":
            for (ann_id, label, shape, _, _), win in zip(objs, windows):
                meta = {"source_id": f"{file_name}#{ann_id}", "image": file_name, "annotation_id": ann_id}
                yield RawSample(key=f"{os.path.splitext(file_name)[0]}_{ann_id}", image=img, label=label,
                                scale=scale, window=win, shapes=[shape], meta=meta)
        else:
            label = max((o for o in objs if not o[3]), key=lambda o: o[4])[1]
            yield RawSample(key=os.path.splitext(file_name)[0], image=img, label=label, scale=scale,
                            window=None, shapes=[o[2] for o in objs], meta={"source_id": file_name})
