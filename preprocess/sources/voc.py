"""Pascal VOC (2007/2012 layout): XML boxes, plus instance/class segmentation PNGs where present.

    <root>[/VOC2012]/Annotations/<id>.xml            <object><name> <truncated> <difficult> <bndbox>
    <root>/JPEGImages/<id>.jpg
    <root>/ImageSets/Main/<split>.txt                image ids of a split (train, val, trainval, test)
    <root>/ImageSets/Segmentation/<split>.txt        the (smaller) subset with masks (--require-masks)
    <root>/SegmentationObject/<id>.png               palette PNG, index k = the k-th <object> of the XML
    <root>/SegmentationClass/<id>.png                palette PNG, index = class number (1..20)

Both PNGs use 0 for background and 255 for the void border, which becomes "unknown" (soft 0).
Box corners in the XML are 1-based inclusive pixels: x = xmin - 1, w = xmax - xmin + 1.

Exports of annotation tools are accepted too (Annotations/ + JPEGImages/ without ImageSets/, and
labelImg's XML beside each image; see voc_layout.py): `--split all` builds every annotated image,
`--val-fraction F` splits train / val. The image is the XML's <filename> in JPEGImages/ (or beside
the XML); <path> (a path on the annotator's machine) is never read, and a <filename> that leaves
its folder is skipped as "path outside root".
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from shards.storage import sha256_file

from preprocess.geometry import ImageError, clip_box, reduce_if_large, resolves_inside, square_window
from preprocess.sources.base import RawSample, Shape, Skip, Source, SourceError, WorkItem
from preprocess.sources.class_folders import IMAGE_EXTS, files_digest
from preprocess.sources.masks import VOID_INDEX, MaskError, read_mask_values
from preprocess.sources.voc_layout import VocLayoutError, flat_xmls, parse_voc_xml, voc_layout

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]


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
    item_file_keys = ("images_sha256", "masks_sha256")

    @dataclass
    class Options:
        keep_difficult: bool = field(default=False, metadata={"help": "also make samples of objects marked difficult"})
        use_masks: bool = field(default=True, metadata={"help": "use SegmentationObject/Class PNGs when present"})
        segmentation_split: bool = field(default=False, metadata={
            "help": "take the split from ImageSets/Segmentation (only images that have masks)"})
        val_fraction: float = field(default=0.0, metadata={
            "help": "folders without ImageSets split lists (tool exports): --split val takes this fraction of "
                    "the images (chosen by a hash of each id), --split train the rest; --split all takes every image"})
        classes_file: str = field(default="", metadata={
            "help": "class names, one per line, in label order (a relative path is under --root); default: "
                    "the 20 VOC classes, or for folders without split lists the names found in all their XML "
                    "files when any is not a VOC class"})

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.root:
            raise SourceError(f"{self.name}: --root DIR (VOCdevkit/VOC20xx, or a folder of labelImg XML files) is required")
        o = self.options
        try:
            self.layout = voc_layout(cfg.root, cfg.split, o.segmentation_split, o.val_fraction)
            self._classes = self._read_classes()
        except VocLayoutError as e:
            raise SourceError(str(e)) from None
        self.root = self.layout.root
        self.class_index = {c: i for i, c in enumerate(self._classes)}

    def _read_classes(self) -> list[str]:
        if self.options.classes_file:  # (relative: under --root, as mask-folders' list files)
            path = Path(self.options.classes_file)
            path = path if path.is_absolute() else Path(self.cfg.root) / path
            try:
                names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise VocLayoutError(f"{path}: cannot read class names ({e})") from None
            if not names or len(set(names)) != len(names):
                raise VocLayoutError(f"{path}: no class names, or a name repeated")
            return names
        if self.layout.split_rule == "list":
            return list(VOC_CLASSES)
        # a tool's export: its own classes, from every XML of the folder (not only this split, so
        # that train and val agree); the VOC list when they are all VOC classes
        lay = self.layout
        xmls = flat_xmls(lay.root) if lay.flat else sorted((lay.root / "Annotations").glob("*.xml"))
        found = set()
        for xml in xmls:
            try:
                found.update(o.name for o in parse_voc_xml(xml).objects if o.name)
            except VocLayoutError:
                continue  # skipped (and counted) when its split is built
        return list(VOC_CLASSES) if found <= set(VOC_CLASSES) else sorted(found)

    def fingerprint(self) -> dict:
        lay = self.layout
        entries = [(i, xml) for i, xml in lay.entries if lay.flat or self.path_problem(f"{i}.xml") is None]
        h = hashlib.sha256()
        for i, xml in entries:
            h.update(f"{i}\t{sha256_file(xml) if xml.is_file() else '-'}\n".encode("utf-8", "surrogateescape"))
        if lay.flat:
            images = sorted(p for p in lay.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
            pngs = []
        else:
            images = [self.root / "JPEGImages" / f"{i}.jpg" for i, _ in entries]
            pngs = [self.root / d / f"{i}.png" for i, _ in entries for d in ("SegmentationObject", "SegmentationClass")]
        fp = {"split_list": lay.list_path.name if lay.list_path else None,
              "split_list_sha256": sha256_file(lay.list_path) if lay.list_path else None,
              "annotations_sha256": h.hexdigest(), "ids": len(lay.entries),
              "images_sha256": files_digest(images, self.root),
              "masks_sha256": files_digest([p for p in pngs if p.is_file()], self.root)}
        # (kept out of the classic layout's fingerprint: builds made before these existed resume)
        if lay.split_rule != "list":
            fp.update(layout="labelImg" if lay.flat else "voc", split_rule=lay.split_rule)
        if self._classes != VOC_CLASSES:
            fp["classes"] = self._classes
        return fp

    def _image_path(self, xml: Path, image_id: str, filename: str) -> Path:
        """The image of an annotation: its <filename> in JPEGImages/ (beside the XML for labelImg);
        else a file named like the XML with an image extension (tools that write <filename>
        without one, or another one). A missing image is skipped when loaded."""
        folder = xml.parent if self.layout.flat else self.root / "JPEGImages"
        path = folder / filename
        if not path.is_file():
            stem = xml.stem if self.layout.flat else image_id
            for ext in IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS):
                if (folder / (stem + ext)).is_file():
                    return folder / (stem + ext)
        return path

    def items(self) -> tuple[list[WorkItem], list[Skip]]:
        items, skips = [], []
        object_unit = self.cfg.unit == "object"
        for image_id, xml in self.layout.entries:
            problem = None if self.layout.flat else self.path_problem(f"{image_id}.xml")
            if problem:
                skips.append(Skip(image_id, problem, f"{self.layout.list_path}: {image_id!r}"))
                continue
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
            problem = self.path_problem(ann.filename)
            if problem:  # <filename> leaves its folder: never opened
                skips.append(Skip(image_id, problem, f"{xml}: <filename> {ann.filename!r}",
                                  len(objs) if object_unit else 1))
                continue
            path = self._image_path(xml, image_id, ann.filename)
            name = ann.filename if path.name == Path(ann.filename).name else path.name
            data = (image_id, os.path.relpath(path, self.root), name, ann.width, ann.height, objs)
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
            if self.layout.flat or not (self.options.use_masks and p.is_file()):
                out.append(None)
                continue
            try:
                if not (self.cfg.allow_outside_root or resolves_inside(p, self.root)):
                    raise MaskError(f"{p}: resolves outside {self.root}")
                values, _ = read_mask_values(p, self.cfg.max_pixels)
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

    def item_files(self, item: WorkItem) -> list[Path]:
        image_id, rel = item.data[:2]
        masks = [] if self.layout.flat else [self.root / d / f"{image_id}.png" for d in ("SegmentationObject", "SegmentationClass")]
        return [self.root / rel] + masks

    def item_files(self, item: WorkItem) -> list[Path]:
        image_id, rel = item.data[:2]
        masks = [] if self.layout.flat else [self.root / d / f"{image_id}.png" for d in ("SegmentationObject", "SegmentationClass")]
        return [self.root / rel] + masks

    def load(self, item: WorkItem):
        image_id, rel, filename, w, h, objs = item.data
        path = self.root / rel
        if self.cfg.unit == "object":
            reduce = reduce_if_large(self.cfg.size, min(square_window(o[2], self.cfg.context)[2] for o in objs))
        else:
            reduce = reduce_if_large(self.cfg.size)
        try:
            decoded = self.read_image(path, self.root, reduce)
        except ImageError as e:
            yield Skip(item.id, e.reason, e.detail, item.expected)
            return
        img, scale = decoded.pixels, decoded.scale
        if (decoded.height, decoded.width) != (h, w):
            yield Skip(item.id, "image size differs from annotation",
                       f"{path}: {decoded.width}x{decoded.height}, XML says {w}x{h}", item.expected)
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
                yield RawSample(key=f"{image_id}_{k}", image=img, label=label, scale=scale,
                                window=square_window(box, self.cfg.context), shapes=[shape], meta=meta)
        else:
            candidates = [o for o in objs if not o[3]] or objs
            label = max(candidates, key=lambda o: (o[2][2] - o[2][0]) * (o[2][3] - o[2][1]))[1]
            yield RawSample(key=image_id, image=img, label=label, scale=scale, shapes=shapes, meta=base)
