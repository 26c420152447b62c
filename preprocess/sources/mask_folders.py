"""Image + mask folders (Flowers-17 / Oxford-IIIT Pet style): masks matched to images by file stem.

    <root>/<images>/[<class>/]<stem>.jpg     images: images/, jpg/ or JPEGImages/ (or --images DIR)
    <root>/<masks>/<stem>.png                masks: masks/, trimaps/, annotations/trimaps/ (or --masks DIR)

Labels come from class folders under the image folder, or from a list file (--labels FILE):
CSV or whitespace-separated lines "<stem>[.ext] <label> ...", '#' comments skipped, label an
integer (minus --label-base; Oxford-IIIT's annotations/list.txt counts from 1) or a class name.
Class names: --classes FILE (one per line), else the sorted names / "0".."K-1".
A split is the stems listed in <split>.txt under <root> or <root>/annotations (Oxford's
trainval.txt / test.txt), or images/<split>/ when the images are split into folders, or else
every image (then the one folder is the split asked for).
Mask values are mapped as described in `preprocess.sources.masks` (trimaps: unknown -> soft 0).
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shards.storage import sha256_file

from preprocess.geometry import ImageError, resolves_inside
from preprocess.sources.base import PATH_OUTSIDE_ROOT, RawSample, Shape, Skip, Source, SourceError, WorkItem
from preprocess.sources.class_folders import IMAGE_EXTS, files_digest, skips_from
from preprocess.sources.masks import MASK_KINDS, MaskError, load_mask, mask_bbox

IMAGE_DIRS = ("images", "jpg", "JPEGImages")
MASK_DIRS = ("masks", "trimaps", "annotations/trimaps", "segmentations", "SegmentationClass")
MASK_EXTS = (".png", ".bmp", ".gif", ".tif", ".tiff", ".pgm", ".ppm", ".jpg")


class MaskFolderLayoutError(ValueError):
    """Fatal layout problem; the message names the file or folder."""


@dataclass
class MaskRecord:
    stem: str
    image: Path
    mask: Path
    label: int


@dataclass
class MaskFolderSplit:
    records: list[MaskRecord]
    classes: list[str]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)  # list files read (for the fingerprint)
    image_dir: Path | None = None  # files (symlinks followed) must lie inside these folders
    mask_dir: Path | None = None


def _pick_dir(root: Path, given: str, defaults: tuple[str, ...], what: str) -> Path:
    if given:
        p = Path(given) if Path(given).is_absolute() else root / given
        if not p.is_dir():
            raise MaskFolderLayoutError(f"{p}: no such {what} folder")
        return p
    for d in defaults:
        if (root / d).is_dir():
            return root / d
    raise MaskFolderLayoutError(f"{root}: no {what} folder (looked for {', '.join(d + '/' for d in defaults)}; "
                                f"pass --{what} DIR)")


def _index_files(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    """stem -> file for every file with one of `exts` below folder (the first by sorted path wins)."""
    out: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."):
            out.setdefault(p.stem, p)
    return out


def read_list_file(path: Path) -> list[list[str]]:
    """Rows of a CSV (if it has commas) or whitespace-separated list; comments and blanks dropped."""
    if not path.is_file():
        raise MaskFolderLayoutError(f"{path}: missing list file")
    try:  # bytes that are not UTF-8 kept as the file system keeps them in names
        text = path.read_text(errors="surrogateescape")
    except OSError as e:
        raise MaskFolderLayoutError(f"{path}: cannot read ({e.strerror or e})") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if lines and "," in lines[0]:
        return [[c.strip() for c in row] for row in csv.reader(lines)]
    return [ln.split() for ln in lines]


def _stem(name: str) -> str:
    p = Path(name)
    return p.stem if p.suffix.lower() in IMAGE_EXTS + MASK_EXTS else p.name


def _labels_from_file(path: Path, label_base: int, classes: list[str] | None, skipped: dict):
    rows = read_list_file(path)
    raw = {}
    for n, row in enumerate(rows, 1):
        if len(row) < 2:
            skipped.setdefault("list line without a label", []).append(f"{path}:{n}")
            continue
        raw[_stem(row[0])] = row[1]
    if not raw:
        raise MaskFolderLayoutError(f"{path}: no '<stem> <label>' lines")
    numeric = all(v.lstrip("-").isdigit() for v in raw.values())
    if numeric:
        ints = {k: int(v) - label_base for k, v in raw.items()}
        names = classes or [str(i) for i in range(max(max(ints.values()) + 1, 1))]
    else:
        names = classes or sorted(set(raw.values()))
        pos = {c: i for i, c in enumerate(names)}
        ints = {k: pos.get(v, -1) for k, v in raw.items()}  # unknown name = out of range, skipped below
    return ints, names


def scan_mask_folders(root: str | Path, split: str, *, images: str = "", masks: str = "", labels: str = "",
                      classes_file: str = "", label_base: int = 0, split_file: str = "") -> MaskFolderSplit:
    """Match images to masks and labels for one split. Unmatched files are recorded, not fatal."""
    root = Path(root)
    if not root.is_dir():
        raise MaskFolderLayoutError(f"{root}: no such folder")
    img_dir = _pick_dir(root, images, IMAGE_DIRS, "images")
    mask_dir = _pick_dir(root, masks, MASK_DIRS, "masks")
    skipped: dict[str, list[str]] = {}
    inputs: list[Path] = []
    classes = None
    if classes_file:
        cpath = Path(classes_file) if Path(classes_file).is_absolute() else root / classes_file
        classes = [r[0] for r in read_list_file(cpath)]
        inputs.append(cpath)

    # which stems form the split
    wanted = None
    if split_file:
        lists = [Path(split_file) if Path(split_file).is_absolute() else root / split_file]
    else:
        lists = [p for p in (root / f"{split}.txt", root / "annotations" / f"{split}.txt") if p.is_file()]
    if lists:
        wanted = {_stem(r[0]) for r in read_list_file(lists[0]) if r}
        inputs.append(lists[0])
    base_img_dir = img_dir
    if not lists and (img_dir / split).is_dir():
        img_dir = img_dir / split

    image_files = _index_files(img_dir, IMAGE_EXTS)
    mask_files = _index_files(mask_dir, MASK_EXTS)
    if wanted is not None:
        image_files = {s: p for s, p in image_files.items() if s in wanted}
        mask_files = {s: p for s, p in mask_files.items() if s in wanted}
        for s in sorted(wanted - set(image_files) - set(mask_files)):
            skipped.setdefault("listed in the split file but no image or mask", []).append(s)

    if labels:
        lpath = Path(labels) if Path(labels).is_absolute() else root / labels
        label_of, names = _labels_from_file(lpath, label_base, classes, skipped)
        inputs.append(lpath)
    else:  # class folders directly under the image folder
        # class names from every split's folders, so a class absent from one split shifts no index
        split_dirs = {base_img_dir} | {base_img_dir / d for d in ("train", "val", "test", split)}
        names = classes or sorted({p.parent.name for p in _index_files(base_img_dir, IMAGE_EXTS).values()
                                   if p.parent not in split_dirs})
        if not names:
            raise MaskFolderLayoutError(f"{img_dir}: images are not in class folders; pass --labels FILE")
        pos = {c: i for i, c in enumerate(names)}
        label_of = {s: (pos.get(p.parent.name, -1) if p.parent != img_dir else None) for s, p in image_files.items()}

    records = []
    for stem in sorted(set(image_files) | set(mask_files)):
        img, msk = image_files.get(stem), mask_files.get(stem)
        if img is None:
            skipped.setdefault("mask without an image", []).append(str(msk))
            continue
        if msk is None:
            skipped.setdefault("image without a mask", []).append(str(img))
            continue
        label = label_of.get(stem)
        if label is None:
            skipped.setdefault("image without a label", []).append(str(img))
            continue
        if not 0 <= label < len(names):
            skipped.setdefault("label out of range", []).append(str(img))
            continue
        records.append(MaskRecord(stem, img, msk, label))
    return MaskFolderSplit(records, names, skipped, inputs, base_img_dir, mask_dir)


# ----------------------------------------------------------------------------- the Source

log = logging.getLogger("preprocess")


class MaskFolderSource(Source):
    """Images + segmentation masks / trimaps matched by stem (Flowers-17, Oxford-IIIT Pet, ...).

        preprocess build-shards mask-folders --root data/oxford-iiit-pet --images images \\
            --masks annotations/trimaps --labels annotations/list.txt --label-base 1 \\
            --split trainval --size 64 --out shards/pets/trainval

    One sample per image (the whole image padded to a square). --saliency mask uses the mask
    (trimap border = unknown = grey 128 before the blur), --saliency box its foreground's box.
    A mask whose size differs from its image is resized (nearest) with a warning in the log and
    in the sample's json."""

    name = "mask-folders"
    not_pickled = ("_split",)
    channels = 3
    has_masks = True
    has_boxes = True
    units = ("image",)
    item_file_keys = ("image_list_sha256", "mask_list_sha256")
    config_defaults = {"unit": "image"}  # for flags the user did not give

    @dataclass
    class Options:
        masks: str = field(default="", metadata={"help": "mask folder (default: masks/, trimaps/ or annotations/trimaps/ under --root)"})
        labels: str = field(default="", metadata={"help": "list file '<stem> <label>' (CSV or whitespace); default: class folders"})
        classes_file: str = field(default="", metadata={"help": "class names, one per line, in label order"})
        label_base: int = field(default=0, metadata={"help": "subtract from integer labels (1 for Oxford-IIIT list.txt)"})
        split_file: str = field(default="", metadata={"help": "file listing the split's stems (default: <split>.txt under --root or annotations/)"})
        mask_kind: str = field(default="auto", metadata={"help": f"mask value mapping: {'|'.join(MASK_KINDS)}"})

    def __init__(self, cfg):
        super().__init__(cfg)
        o = self.options
        if not cfg.root:
            raise SourceError(f"{self.name}: --root DIR is required")
        if o.mask_kind not in MASK_KINDS:
            raise SourceError(f"{self.name}: --mask-kind must be one of {MASK_KINDS}, got {o.mask_kind!r}")
        self.root = Path(cfg.root)
        try:
            self._split = scan_mask_folders(self.root, cfg.split, images=cfg.images, masks=o.masks, labels=o.labels,
                                            classes_file=o.classes_file, label_base=o.label_base,
                                            split_file=o.split_file)
        except MaskFolderLayoutError as e:
            raise SourceError(str(e)) from None
        if not self._split.records:
            reasons = ", ".join(f"{len(v)} {k}" for k, v in sorted(self._split.skipped.items())) or "no files"
            raise SourceError(f"{self.root}: no image with a mask and a label in split {cfg.split!r} ({reasons})")
        self._classes = self._split.classes
        self.image_dir, self.mask_dir = self._split.image_dir, self._split.mask_dir  # (_split is not pickled)

    def fingerprint(self) -> dict:
        recs = self._split.records
        return {"lists": {os.path.relpath(p, self.root): sha256_file(p) for p in self._split.inputs},
                "images": len(recs), "image_list_sha256": files_digest([r.image for r in recs], self.root),
                "mask_list_sha256": files_digest([r.mask for r in recs], self.root)}

    def items(self) -> tuple[list[WorkItem], list[Skip]]:
        items = [WorkItem(r.stem, 1, (str(r.image), str(r.mask), r.label)) for r in self._split.records]
        return items, skips_from(self._split.skipped)

    def item_files(self, item: WorkItem) -> list[Path]:
        return [Path(item.data[0]), Path(item.data[1])]

    def load(self, item: WorkItem):
        image_path, mask_path, label = item.data
        cfg = self.cfg
        try:
            img = self.read_image(image_path, self.image_dir).pixels
            if not (cfg.allow_outside_root or resolves_inside(mask_path, self.mask_dir)):
                raise ImageError(PATH_OUTSIDE_ROOT, f"{mask_path} resolves outside {self.mask_dir}")
            target, warning = load_mask(mask_path, self.options.mask_kind, img.shape[:2], cfg.max_pixels)
        except ImageError as e:
            yield Skip(item.id, e.reason, e.detail)
            return
        except MaskError as e:
            yield Skip(item.id, e.reason, str(e))
            return
        if not (target > 0).any():  # nothing salient: neither a mask nor a box map would mean anything
            yield Skip(item.id, "mask without foreground", mask_path)
            return
        meta = {"source_id": os.path.relpath(image_path, self.root), "mask": os.path.relpath(mask_path, self.root)}
        if warning:
            log.warning(warning)
            meta["warning"] = "mask resized (nearest) to the image size"
        yield RawSample(key=item.id, image=img, label=label, shapes=[mask_shape(target)], meta=meta)


def mask_shape(target: np.ndarray) -> Shape:
    """A {-1, 0, +1} target map over the whole image as a Shape: mask in [0, 1] with 0.5 = unknown
    (what the pipeline reads as saliency 0), box = the foreground's bounding box (--saliency box)."""
    x, y, w, h = mask_bbox(target)
    box = (x, y, x + w, y + h)
    return Shape(box=box, mask=((target + 1.0) * 0.5).astype(np.float32))
