"""Tiny ImageNet (tiny-imagenet-200.zip, unpacked) with its bounding boxes as weak saliency.

    <root>/wnids.txt                                   one WordNet id per line = the classes, in order
    <root>/words.txt                                   optional: "<wnid>\\t<names>" (all of ImageNet)
    <root>/train/<wnid>/<wnid>_boxes.txt               "<file>\\t<x0>\\t<y0>\\t<x1>\\t<y1>" per image
    <root>/train/<wnid>/images/<wnid>_<n>.JPEG
    <root>/val/val_annotations.txt                     "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>"
    <root>/val/images/val_<n>.JPEG
    <root>/test/images/test_<n>.JPEG                   no labels: refused (nothing to train or score)

Box corners are inclusive pixel coordinates of the 64x64 image (0 0 63 63 = the whole image), so
width = x1 - x0 + 1. Boxes are returned as [x, y, w, h] floats, the COCO convention used elsewhere.
A val file name that leaves val/images/ ("../x", "/abs") is skipped as "path outside root"; a
wnid that is not a plain folder name stops the build (the class table is broken).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from shards.storage import sha256_file

from preprocess.geometry import ImageError, clip_box, square_window
from preprocess.sources.base import RawSample, Shape, Skip, Source, SourceError, WorkItem, path_problem
from preprocess.sources.class_folders import files_digest, skips_from

IMAGE_EXTS = (".jpeg", ".jpg", ".png")


class TinyImageNetLayoutError(ValueError):
    """The folder is not a Tiny ImageNet layout; the message names the file and the problem."""


@dataclass
class TinyRecord:
    """One labelled image: path, class index, boxes [[x, y, w, h]] (may be empty)."""

    path: Path
    label: int
    wnid: str
    boxes: list = field(default_factory=list)


@dataclass
class TinySplit:
    records: list[TinyRecord]
    classes: list[str]               # human-readable names (first synonym from words.txt, else the wnid)
    wnids: list[str]
    skipped: dict[str, list[str]]    # reason -> [file or line, ...]: recorded, not fatal
    inputs: list[Path]               # annotation files read (for the build fingerprint)


def read_wnids(root: Path) -> list[str]:
    path = root / "wnids.txt"
    if not path.is_file():
        raise TinyImageNetLayoutError(f"{path}: missing (not a Tiny ImageNet folder?)")
    wnids = [w.strip() for w in _read_lines(path) if w.strip()]
    if not wnids:
        raise TinyImageNetLayoutError(f"{path}: empty")
    if len(set(wnids)) != len(wnids):
        raise TinyImageNetLayoutError(f"{path}: repeated wnids")
    for n, w in enumerate(wnids, 1):  # each is a folder name under train/: never a path
        if "/" in w or w in (".", "..") or path_problem(w) is not None:
            raise TinyImageNetLayoutError(f"{path}: wnid {n} ({w!r}) is not a plain folder name")
    return wnids


def _read_lines(path: Path) -> list[str]:
    """Lines of an annotation text file. Bytes that are not UTF-8 are kept as the file system keeps
    them in names (surrogateescape), so a listed name still matches its file."""
    try:
        return path.read_text(errors="surrogateescape").splitlines()
    except OSError as e:
        raise TinyImageNetLayoutError(f"{path}: cannot read ({e.strerror or e})") from None


def read_words(root: Path, wnids: list[str]) -> list[str]:
    """Class names: the first synonym of each wnid in words.txt; the wnid itself when absent."""
    path = root / "words.txt"
    names = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            if text:
                names[wnid.strip()] = text.split(",")[0].strip()
    return [names.get(w, w) for w in wnids]


def _parse_box(fields: list[str], where: str, skipped: dict) -> list | None:
    try:
        x0, y0, x1, y1 = (float(v) for v in fields)
    except ValueError:
        skipped.setdefault("malformed box line", []).append(where)
        return None
    if not (x1 >= x0 and y1 >= y0) or min(x0, y0) < 0:
        skipped.setdefault("invalid box (negative or reversed corners)", []).append(where)
        return None
    return [x0, y0, x1 - x0 + 1.0, y1 - y0 + 1.0]


def _train_records(root: Path, wnids: list[str], skipped: dict, inputs: list) -> list[TinyRecord]:
    records = []
    for label, wnid in enumerate(wnids):
        cdir = root / "train" / wnid
        boxes_path = cdir / f"{wnid}_boxes.txt"
        if not cdir.is_dir():
            raise TinyImageNetLayoutError(f"{cdir}: missing class folder for wnid {wnid} listed in wnids.txt")
        if not boxes_path.is_file():
            raise TinyImageNetLayoutError(f"{boxes_path}: missing boxes file")
        inputs.append(boxes_path)
        boxes = {}
        for n, line in enumerate(_read_lines(boxes_path), 1):
            f = line.split()
            if not f:
                continue
            if len(f) != 5:
                skipped.setdefault("malformed box line", []).append(f"{boxes_path}:{n}")
                continue
            box = _parse_box(f[1:], f"{boxes_path}:{n}", skipped)
            if box is not None:
                boxes.setdefault(f[0], []).append(box)
        images = sorted(p for p in (cdir / "images").glob("*") if p.suffix.lower() in IMAGE_EXTS)
        present = {p.name for p in images}
        for name in sorted(set(boxes) - present):
            skipped.setdefault("box for a missing image", []).append(str(cdir / "images" / name))
        for p in images:
            if p.name not in boxes:
                skipped.setdefault("image without a box", []).append(str(p))
                continue
            records.append(TinyRecord(p, label, wnid, boxes[p.name]))
    return records


def _val_records(root: Path, wnids: list[str], skipped: dict, inputs: list,
                 allow_outside_root: bool = False) -> list[TinyRecord]:
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise TinyImageNetLayoutError(f"{ann}: missing (val labels and boxes live there)")
    inputs.append(ann)
    index = {w: i for i, w in enumerate(wnids)}
    by_file: dict[str, TinyRecord] = {}
    img_dir = root / "val" / "images"
    for n, line in enumerate(_read_lines(ann), 1):
        f = line.split()
        if not f:
            continue
        where = f"{ann}:{n}"
        if len(f) != 6:
            skipped.setdefault("malformed annotation line", []).append(where)
            continue
        if f[1] not in index:
            skipped.setdefault("label not in wnids.txt", []).append(where)
            continue
        problem = path_problem(f[0], allow_outside_root)
        if problem:  # never joined below val/images, never opened
            skipped.setdefault(problem, []).append(f"{where}: {f[0]!r}")
            continue
        box = _parse_box(f[2:], where, skipped)
        rec = by_file.setdefault(f[0], TinyRecord(img_dir / f[0], index[f[1]], f[1]))
        if rec.wnid != f[1]:
            skipped.setdefault("image listed with two labels", []).append(where)
            continue
        if box is not None:
            rec.boxes.append(box)
    records = []
    for name in sorted(by_file):
        rec = by_file[name]
        if not rec.path.is_file():
            skipped.setdefault("annotation for a missing image", []).append(str(rec.path))
        elif not rec.boxes:
            skipped.setdefault("image without a box", []).append(str(rec.path))
        else:
            records.append(rec)
    if img_dir.is_dir():
        for p in sorted(img_dir.glob("*")):
            if p.suffix.lower() in IMAGE_EXTS and p.name not in by_file:
                skipped.setdefault("image without annotation", []).append(str(p))
    return records


def scan_tinyimagenet(root: str | Path, split: str, allow_outside_root: bool = False) -> TinySplit:
    """Parse the layout of one split; fatal layout problems raise TinyImageNetLayoutError."""
    root = Path(root)
    if not root.is_dir():
        raise TinyImageNetLayoutError(f"{root}: no such folder")
    if split == "test":
        raise TinyImageNetLayoutError(f"{root}/test: Tiny ImageNet's test images carry no labels; "
                                      "use --split val for evaluation")
    if split not in ("train", "val"):
        raise TinyImageNetLayoutError(f"{root}: Tiny ImageNet has splits train and val, not {split!r}")
    wnids = read_wnids(root)
    skipped: dict[str, list[str]] = {}
    inputs = [root / "wnids.txt"]
    if split == "train":
        records = _train_records(root, wnids, skipped, inputs)
    else:
        records = _val_records(root, wnids, skipped, inputs, allow_outside_root)
    return TinySplit(records, read_words(root, wnids), wnids, skipped, inputs)


# ----------------------------------------------------------------------------- the Source

class TinyImageNetSource(Source):
    """Tiny ImageNet (200 classes, 64x64); its boxes are the saliency (--saliency box/mask/auto).

        preprocess build-shards tinyimagenet --root data/tiny-imagenet-200 --split train --unit image \\
            --size 64 --out shards/tinyimagenet/train

    Units: `image` (the whole 64x64 image, saliency = its box) or `object` (a square crop around
    the box with --context margin). Splits: train and val (test has no labels)."""

    name = "tinyimagenet"
    not_pickled = ("_split",)
    channels = 3
    has_boxes = True
    units = ("image", "object")
    item_file_keys = ("image_list_sha256",)
    config_defaults = {"unit": "image", "size": 64}  # for flags the user did not give

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.root:
            raise SourceError(f"{self.name}: --root DIR (the unpacked tiny-imagenet-200 folder) is required")
        self.root = Path(cfg.root)
        try:
            self._split = scan_tinyimagenet(self.root, cfg.split, cfg.allow_outside_root)
        except TinyImageNetLayoutError as e:
            raise SourceError(str(e)) from None
        if not self._split.records:
            raise SourceError(f"{self.root}: no labelled images with boxes in split {cfg.split!r}")
        self._classes = self._split.classes

    def fingerprint(self) -> dict:
        sp = self._split
        ann = hashlib.sha256("".join(f"{os.path.relpath(p, self.root)}\t{sha256_file(p)}\n"
                                     for p in sp.inputs).encode()).hexdigest()
        return {"wnids": sp.wnids, "annotation_files": len(sp.inputs), "annotations_sha256": ann,
                "images": len(sp.records),
                "image_list_sha256": files_digest([r.path for r in sp.records], self.root)}

    def items(self) -> tuple[list[WorkItem], list[Skip]]:
        sp = self._split
        items = []
        for r in sp.records:
            rel = os.path.relpath(r.path, self.root)
            n = len(r.boxes) if self.cfg.unit == "object" else 1
            items.append(WorkItem(rel, n, (rel, r.label, r.wnid, [list(b) for b in r.boxes])))
        return items, skips_from(sp.skipped)

    def item_files(self, item: WorkItem) -> list[Path]:
        return [self.root / item.data[0]]

    def load(self, item: WorkItem):
        rel, label, wnid, boxes = item.data
        try:
            img = self.read_image(self.root / rel, self.root).pixels
        except ImageError as e:
            yield Skip(item.id, e.reason, e.detail, item.expected)
            return
        h, w = img.shape[:2]
        shapes = []
        for x, y, bw, bh in boxes:
            box = clip_box((x, y, x + bw, y + bh), w, h)
            if box is None:
                if self.cfg.unit == "object":
                    yield Skip(item.id, "box outside image", f"{rel}: {[x, y, bw, bh]}")
                continue
            shapes.append(Shape(box=box))
        stem = os.path.splitext(rel)[0]
        meta = {"source_id": rel, "wnid": wnid}
        if self.cfg.unit == "object":
            for k, shape in enumerate(shapes):
                yield RawSample(key=f"{stem}_{k}", image=img, label=label,
                                window=square_window(shape.box, self.cfg.context), shapes=[shape], meta=meta)
        elif shapes:
            yield RawSample(key=stem, image=img, label=label, shapes=shapes, meta=meta)
        else:
            yield Skip(item.id, "box outside image", rel)
