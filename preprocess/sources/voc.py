"""Pascal VOC (2007/2012 layout): XML boxes, plus instance/class segmentation PNGs where present.

    <root>[/VOC2012]/Annotations/<id>.xml            <object><name> <truncated> <difficult> <bndbox>
    <root>/JPEGImages/<id>.jpg
    <root>/ImageSets/Main/<split>.txt                image ids of a split (train, val, trainval, test)
    <root>/ImageSets/Segmentation/<split>.txt        the (smaller) subset with masks (--require-masks)
    <root>/SegmentationObject/<id>.png               palette PNG, index k = the k-th <object> of the XML
    <root>/SegmentationClass/<id>.png                palette PNG, index = class number (1..20)

Both PNGs use 0 for background and 255 for the void border, which becomes "unknown" (soft 0).
Box corners in the XML are 1-based inclusive pixels: x = xmin - 1, w = xmax - xmin + 1.
"""
from __future__ import annotations

import hashlib
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from shards.format import sha256_file

from preprocess.geometry import ImageError, clip_box, decode_image, square_window
from preprocess.sources.base import RawSample, Shape, Skip, Source, SourceError, WorkItem
from preprocess.sources.class_folders import files_digest
from preprocess.sources.masks import VOID_INDEX, MaskError, read_mask_values

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]


class VocLayoutError(ValueError):
    """The folder is not a VOC layout or a file is malformed; the message names the file."""


@dataclass
class VocObject:
    name: str
    box: list            # [x, y, w, h], 0-based
    difficult: bool
    truncated: bool
    instance: int        # 1-based position among the XML's objects = index in SegmentationObject


@dataclass
class VocImage:
    image_id: str
    filename: str
    width: int
    height: int
    objects: list[VocObject] = field(default_factory=list)


def _int_flag(node, tag: str) -> bool:
    text = node.findtext(tag)
    return bool(text and text.strip() not in ("0", ""))


def parse_voc_xml(path: str | Path) -> VocImage:
    """One annotation file. Malformed XML or a missing <size>/<bndbox> field raises VocLayoutError."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise VocLayoutError(f"{path}: malformed XML ({e})") from None
    except OSError as e:
        raise VocLayoutError(f"{path}: cannot read ({e})") from None
    try:
        size = root.find("size")
        width, height = int(size.findtext("width")), int(size.findtext("height"))
    except (AttributeError, TypeError, ValueError):
        raise VocLayoutError(f"{path}: missing or malformed <size>") from None
    img = VocImage(path.stem, (root.findtext("filename") or f"{path.stem}.jpg").strip(), width, height)
    for k, obj in enumerate(root.findall("object"), 1):
        bb = obj.find("bndbox")
        try:
            x0, y0, x1, y1 = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise VocLayoutError(f"{path}: object {k} has a missing or malformed <bndbox>") from None
        img.objects.append(VocObject(
            name=(obj.findtext("name") or "").strip(),
            box=[x0 - 1.0, y0 - 1.0, x1 - x0 + 1.0, y1 - y0 + 1.0],
            difficult=_int_flag(obj, "difficult"),
            truncated=_int_flag(obj, "truncated"),
            instance=k,
        ))
    return img


def find_voc_root(root: str | Path) -> Path:
    """`root` itself or its single VOC<year> subfolder (as the tarballs unpack: VOCdevkit/VOC2012)."""
    root = Path(root)
    if (root / "Annotations").is_dir():
        return root
    if root.is_dir():
        subs = sorted(p for p in root.glob("VOC*") if (p / "Annotations").is_dir())
        if len(subs) == 1:
            return subs[0]
        if len(subs) > 1:
            raise VocLayoutError(f"{root}: several VOC folders ({', '.join(p.name for p in subs)}); pass one")
        raise VocLayoutError(f"{root}: no Annotations/ folder (not a Pascal VOC folder?)")
    raise VocLayoutError(f"{root}: no such folder")


def read_split_ids(root: Path, split: str, segmentation: bool = False) -> tuple[list[str], Path]:
    """(image ids, list file) of a split from ImageSets/Main or ImageSets/Segmentation."""
    path = root / "ImageSets" / ("Segmentation" if segmentation else "Main") / f"{split}.txt"
    if not path.is_file():
        have = sorted(p.stem for p in path.parent.glob("*.txt") if "_" not in p.stem) if path.parent.is_dir() else []
        raise VocLayoutError(f"{path}: missing (splits here: {', '.join(have) or 'none'})")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise VocLayoutError(f"{path}: empty split list")
    return ids, path


# ----------------------------------------------------------------------------- the Source

log = logging.getLogger("preprocess")
BORDER_PX = 3  # VOC's void border is ~5 px wide, centred on the object outline


class VocSource(Source):
    """Pascal VOC detection boxes (+ segmentation PNGs where the image has them).

        preprocess build-shards voc --root data/VOCdevkit/VOC2012 --split train --unit object \\
            --size 64 --out shards/voc/train

    Units as for COCO: `object` (one sample per object, square crop with --context margin) and
    `image` (label = the largest non-difficult object). Saliency per object: its instance mask
    from SegmentationObject (or its class region from SegmentationClass, inside its box) when the
    PNG exists and --use-masks, else its box. Difficult objects are skipped (recorded) in the
    object unit unless --keep-difficult; they still count as salient in the image unit."""

    name = "voc"
    channels = 3
    has_masks = True
    has_boxes = True
    units = ("object", "image")

    @dataclass
    class Options:
        keep_difficult: bool = field(default=False, metadata={"help": "also make samples of objects marked difficult"})
        use_masks: bool = field(default=True, metadata={"help": "use SegmentationObject/Class PNGs when present"})
        segmentation_split: bool = field(default=False, metadata={
            "help": "take the split from ImageSets/Segmentation (only images that have masks)"})

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.root:
            raise SourceError(f"{self.name}: --root DIR (VOCdevkit/VOC20xx) is required")
        try:
            self.root = find_voc_root(cfg.root)
            self.ids, self.list_path = read_split_ids(self.root, cfg.split, self.options.segmentation_split)
        except VocLayoutError as e:
            raise SourceError(str(e)) from None
        self.class_index = {c: i for i, c in enumerate(VOC_CLASSES)}

    def classes(self) -> list[str]:
        return list(VOC_CLASSES)

    def fingerprint(self) -> dict:
        h = hashlib.sha256()
        for i in self.ids:
            p = self.root / "Annotations" / f"{i}.xml"
            h.update(f"{i}\t{sha256_file(p) if p.is_file() else '-'}\n".encode())
        pngs = [self.root / d / f"{i}.png" for i in self.ids for d in ("SegmentationObject", "SegmentationClass")]
        return {"split_list": self.list_path.name, "split_list_sha256": sha256_file(self.list_path),
                "annotations_sha256": h.hexdigest(), "ids": len(self.ids),
                "images_sha256": files_digest([self.root / "JPEGImages" / f"{i}.jpg" for i in self.ids], self.root),
                "masks_sha256": files_digest([p for p in pngs if p.is_file()], self.root)}

    def items(self) -> tuple[list[WorkItem], list[Skip]]:
        items, skips = [], []
        object_unit = self.cfg.unit == "object"
        for image_id in self.ids:
            xml = self.root / "Annotations" / f"{image_id}.xml"
            if not xml.is_file():
                skips.append(Skip(image_id, "missing annotation", str(xml)))
                continue
            try:
                ann = parse_voc_xml(xml)
            except VocLayoutError as e:
                skips.append(Skip(image_id, "malformed annotation", str(e)))
                continue
            objs = []
            for o in ann.objects:
                oid = f"{image_id}#{o.instance}"
                if o.name not in self.class_index:
                    skips.append(Skip(oid, "unknown class name", f"{xml}: {o.name!r}"))
                    continue
                box = clip_box((o.box[0], o.box[1], o.box[0] + o.box[2], o.box[1] + o.box[3]), ann.width, ann.height)
                if box is None:
                    skips.append(Skip(oid, "box outside image", f"{xml}: object {o.instance}"))
                    continue
                if object_unit and o.difficult and not self.options.keep_difficult:
                    skips.append(Skip(oid, "difficult object", str(xml)))
                    continue
                objs.append((o.instance, self.class_index[o.name], box, o.difficult, o.truncated))
            if not objs:
                continue
            data = (image_id, ann.filename, ann.width, ann.height, objs)
            if object_unit:
                items.append(WorkItem(image_id, len(objs), data))
            elif any(not d for *_, d, _ in objs) or self.options.keep_difficult:
                items.append(WorkItem(image_id, 1, data))
            else:
                skips.append(Skip(image_id, "only difficult objects", str(xml)))
        return items, skips

    def _masks(self, image_id: str, w: int, h: int):
        """(instance PNG values or None, class PNG values or None), resized to w x h if needed."""
        out = []
        for folder in ("SegmentationObject", "SegmentationClass"):
            p = self.root / folder / f"{image_id}.png"
            if not (self.options.use_masks and p.is_file()):
                out.append(None)
                continue
            try:
                values, _ = read_mask_values(p)
            except MaskError as e:
                log.warning("%s; using boxes", e)
                out.append(None)
                continue
            if values.shape != (h, w):
                log.warning("%s: mask is %dx%d, image is %dx%d; resized with nearest neighbour",
                            p, values.shape[1], values.shape[0], w, h)
                values = cv2.resize(values.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
            out.append(values)
        return out

    @staticmethod
    def _object_mask(values: np.ndarray, index: int, box) -> np.ndarray:
        """float32 mask: 1 where the PNG holds `index`, 0.5 (unknown) on the void border near the box."""
        m = (values == index).astype(np.float32)
        x0, y0, x1, y1 = (int(v) for v in (box[0] - BORDER_PX, box[1] - BORDER_PX, box[2] + BORDER_PX, box[3] + BORDER_PX))
        x0, y0 = max(x0, 0), max(y0, 0)
        region = values[y0:y1, x0:x1]
        m[y0:y1, x0:x1][region == VOID_INDEX] = 0.5
        # only the part inside the box: SegmentationClass marks every object of that class
        keep = np.zeros_like(m)
        keep[y0:y1, x0:x1] = m[y0:y1, x0:x1]
        return keep

    def load(self, item: WorkItem):
        image_id, filename, w, h, objs = item.data
        path = self.root / "JPEGImages" / filename
        try:
            img, _ = decode_image(path, self.channels)
        except ImageError as e:
            yield Skip(item.id, e.reason, e.detail, item.expected)
            return
        if img.shape[:2] != (h, w):
            yield Skip(item.id, "image size differs from annotation",
                       f"{path}: {img.shape[1]}x{img.shape[0]}, XML says {w}x{h}", item.expected)
            return
        inst, cls = self._masks(image_id, w, h)
        shapes = []
        for k, label, box, _, _ in objs:
            mask = None
            if inst is not None and (inst == k).any():
                mask = self._object_mask(inst, k, box)
            elif cls is not None:
                mask = self._object_mask(cls, label + 1, box)
            shapes.append(Shape(box=tuple(box), mask=mask))
        base = {"source_id": image_id, "image": filename}
        if self.cfg.unit == "object":
            for (k, label, box, difficult, truncated), shape in zip(objs, shapes):
                meta = dict(base, object=k, difficult=difficult, truncated=truncated)
                yield RawSample(key=f"{image_id}_{k}", image=img, label=label,
                                window=square_window(box, self.cfg.context), shapes=[shape], meta=meta)
        else:
            candidates = [o for o in objs if not o[3]] or objs
            label = max(candidates, key=lambda o: (o[2][2] - o[2][0]) * (o[2][3] - o[2][1]))[1]
            yield RawSample(key=image_id, image=img, label=label, shapes=shapes, meta=base)
