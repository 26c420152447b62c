"""Pascal VOC folders as they come: the classic VOCdevkit tree, a tool's export without ImageSets/,
labelImg's XML files beside their images; and one annotation XML parsed. Used by `voc.VocSource`.

    <root>[/VOC2012]/Annotations/<id>.xml + JPEGImages/ + ImageSets/Main/<split>.txt   the classic tree
    <root>/Annotations/*.xml + JPEGImages/, no ImageSets/    CVAT, Roboflow... "Pascal VOC" exports
    <root>/**/<name>.xml beside <name>.jpg                    labelImg: the XML next to its image

Without split lists, split "all" is every annotation file, and --val-fraction F makes splits train /
val from a hash of each image id (stable when files are added or removed).
"""
from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path


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
    """`root` itself or its single VOC<year> subfolder (as the tarballs unpack: VOCdevkit/VOC2012);
    `root` also when it holds .xml files beside images (labelImg's layout, no Annotations/)."""
    root = Path(root)
    if (root / "Annotations").is_dir():
        return root
    if root.is_dir():
        subs = sorted(p for p in root.glob("VOC*") if (p / "Annotations").is_dir())
        if len(subs) == 1:
            return subs[0]
        if len(subs) > 1:
            raise VocLayoutError(f"{root}: several VOC folders ({', '.join(p.name for p in subs)}); pass one")
        if flat_xmls(root):
            return root
        raise VocLayoutError(f"{root}: no Annotations/ folder and no .xml annotation files (not a Pascal VOC folder?)")
    raise VocLayoutError(f"{root}: no such folder")


def flat_xmls(root: Path) -> list[Path]:
    """labelImg's layout: every .xml below root, sorted; hidden folders and a VOC tree's
    Annotations/ folders left out (a folder that merely holds a VOCdevkit is not this layout)."""
    return sorted(p for p in root.rglob("*.xml") if p.is_file() and not any(
        part.startswith(".") or part == "Annotations" for part in p.relative_to(root).parts[:-1]))


def read_split_ids(root: Path, split: str, segmentation: bool = False) -> tuple[list[str], Path]:
    """(image ids, list file) of a split from ImageSets/Main or ImageSets/Segmentation."""
    path = root / "ImageSets" / ("Segmentation" if segmentation else "Main") / f"{split}.txt"
    if not path.is_file():
        have = sorted(p.stem for p in path.parent.glob("*.txt") if "_" not in p.stem) if path.parent.is_dir() else []
        raise VocLayoutError(f"{path}: missing (splits here: {', '.join(have) or 'none'})")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise VocLayoutError(f"{path}: cannot read ({e})") from None
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not ids:
        raise VocLayoutError(f"{path}: empty split list")
    return ids, path


def in_val_fraction(image_id: str, fraction: float) -> bool:
    """Whether an image falls in the held-out `fraction` (a hash of its id: the same image always
    lands on the same side, whatever else is in the folder)."""
    digest = hashlib.sha256(image_id.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < fraction


@dataclass
class VocLayout:
    root: Path
    flat: bool  # labelImg: each XML beside its image, no Annotations/ / JPEGImages/
    entries: list[tuple[str, Path]]  # (image id, annotation XML) of the split, in order
    list_path: Path | None  # the ImageSets list read (None: every XML, or a --val-fraction split)
    split_rule: str  # "list", "all" or "val-fraction F"


def voc_layout(root: str | Path, split: str, segmentation: bool = False, val_fraction: float = 0.0) -> VocLayout:
    """The annotation files of one split, in whichever layout `root` holds (module docstring)."""
    root = find_voc_root(root)
    flat = not (root / "Annotations").is_dir()
    if flat:
        xmls = flat_xmls(root)
        ids = [p.relative_to(root).with_suffix("").as_posix() for p in xmls]
        where = f"{len(xmls)} .xml files beside their images (labelImg layout)"
        lists = []
    else:
        xmls = sorted((root / "Annotations").glob("*.xml"))
        ids = [p.stem for p in xmls]
        where = f"{len(xmls)} .xml files in Annotations/"
        lists = sorted((root / "ImageSets" / "Main").glob("*.txt")) if (root / "ImageSets" / "Main").is_dir() else []
        if val_fraction and lists:
            raise VocLayoutError(f"{root / 'ImageSets' / 'Main'}: has split lists; --val-fraction applies only "
                                 "to folders without them")
        list_file = root / "ImageSets" / ("Segmentation" if segmentation else "Main") / f"{split}.txt"
        if list_file.is_file() or segmentation or (lists and split != "all"):
            try:
                list_ids, path = read_split_ids(root, split, segmentation)
            except VocLayoutError as e:
                raise VocLayoutError(f"{e}; or pass --split all to build all {where}") from None
            return VocLayout(root, False, [(i, root / "Annotations" / f"{i}.xml") for i in list_ids], path, "list")
    if not 0.0 <= val_fraction < 1.0:
        raise VocLayoutError(f"{root}: --val-fraction must be in [0, 1), got {val_fraction}")
    if split == "all":
        return VocLayout(root, flat, list(zip(ids, xmls)), None, "all")
    if val_fraction and split in ("train", "val"):
        keep = [(i, p) for i, p in zip(ids, xmls) if in_val_fraction(i, val_fraction) == (split == "val")]
        return VocLayout(root, flat, keep, None, f"val-fraction {val_fraction}")
    raise VocLayoutError(f"{root}: no split list for {split!r} (found {where}, no ImageSets/Main/{split}.txt); "
                         "pass --split all to build every annotated image, or --split train|val with "
                         "--val-fraction F to hold out a fraction F as val")
