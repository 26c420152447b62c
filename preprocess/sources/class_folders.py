"""Plain class folders (the ImageFolder layout): one sub-folder per class, images inside.

    <root>/<split>/<class>/<any>/<depth>/<image>     with split folders (train/, val/, test/)
    <root>/<class>/<image>                           without: <root> is the split asked for

Image files (symlinks followed) must lie inside <root>: a link leading out is skipped as "path
outside root" unless --allow-outside-root (a folder of links into a shared image pool needs it).

Classes are the sorted union of class-folder names over every split folder present, so a class
missing from one split does not shift the indices of the others (train and test must agree).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from preprocess.geometry import ImageError, reduce_if_large
from preprocess.sources.base import RawSample, Skip, Source, SourceError, WorkItem

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLIT_NAMES = ("train", "val", "test")


class ClassFolderLayoutError(ValueError):
    """The folder is not a class-folder layout; the message names the folder and the problem."""


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_folder(root: str | Path, split: str) -> Path:
    """The folder whose sub-folders are the classes of `split`."""
    root = Path(root)
    if not root.is_dir():
        raise ClassFolderLayoutError(f"{root}: no such folder")
    if (root / split).is_dir():
        return root / split
    present = [s for s in SPLIT_NAMES if (root / s).is_dir()]
    if present:
        raise ClassFolderLayoutError(f"{root}: no {split}/ folder (split folders here: {', '.join(present)})")
    return root


def list_classes(root: str | Path, split: str) -> list[str]:
    root = Path(root)
    folder = split_folder(root, split)
    if folder == root:
        names = set(_class_dirs(root))
    else:
        names = set()
        for s in SPLIT_NAMES:
            if (root / s).is_dir():
                names |= set(_class_dirs(root / s))
    if not names:
        raise ClassFolderLayoutError(f"{folder}: no class sub-folders")
    return sorted(names)


def list_images(root: str | Path, split: str) -> tuple[list[tuple[Path, int]], list[str], dict[str, list[str]]]:
    """([(image path, class index)], class names, skipped {reason: [path]}) in a stable order."""
    folder = split_folder(root, split)
    classes = list_classes(root, split)
    items, skipped = [], {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            skipped.setdefault("file outside a class folder", []).append(str(p))
    for label, name in enumerate(classes):
        cdir = folder / name
        if not cdir.is_dir():
            continue
        for p in sorted(cdir.rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.suffix.lower() in IMAGE_EXTS:
                items.append((p, label))
            else:
                skipped.setdefault("not an image file name", []).append(str(p))
    return items, classes, skipped


def files_digest(paths, root: Path) -> str:
    """sha256 over "relative path<TAB>byte size" lines: cheap (stat only), catches added,
    removed and replaced files. Shared by the folder-based sources' fingerprints."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        size = p.stat().st_size if p.is_file() else -1
        h.update(f"{os.path.relpath(p, root)}\t{size}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def skips_from(skipped: dict[str, list[str]]) -> list[Skip]:
    """A scanner's {reason: [file, ...]} as the build's Skip records."""
    return [Skip(Path(d).name, reason, d) for reason, details in sorted(skipped.items()) for d in details]


# ----------------------------------------------------------------------------- the Source

class ClassFolderSource(Source):
    """Plain class folders (ImageFolder layout); label = the class folder.

        preprocess build-shards class-folders --root data/flowers --split train --size 64 \\
            --saliency foreground --out shards/flowers/train

    Unannotated: saliency from --saliency foreground or none. --grey makes 1-channel samples."""

    name = "class-folders"
    channels = 3
    units = ("image",)
    item_file_keys = ("image_list_sha256",)
    config_defaults = {"unit": "image"}  # for flags the user did not give

    @dataclass
    class Options:
        grey: bool = field(default=False, metadata={"help": "store 1-channel grey samples instead of RGB"})

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.root:
            raise SourceError(f"{self.name}: --root DIR is required")
        self.channels = 1 if self.options.grey else 3
        self.root = Path(cfg.root)
        try:
            self.folder = split_folder(self.root, cfg.split)
            self._classes = list_classes(self.root, cfg.split)
        except ClassFolderLayoutError as e:
            raise SourceError(str(e)) from None

    def _listing(self):
        try:
            return list_images(self.root, self.cfg.split)
        except ClassFolderLayoutError as e:
            raise SourceError(str(e)) from None

    def fingerprint(self) -> dict:
        files, classes, _ = self._listing()
        return {"classes": classes, "images": len(files),
                "image_list_sha256": files_digest([p for p, _ in files], self.folder)}

    def items(self) -> tuple[list[WorkItem], list[Skip]]:
        files, _, skipped = self._listing()
        if not files:
            raise SourceError(f"{self.folder}: no image files in the class folders")
        items = [WorkItem(os.path.relpath(p, self.folder), 1, (os.path.relpath(p, self.folder), label))
                 for p, label in files]
        return items, skips_from(skipped)

    def item_files(self, item: WorkItem) -> list[Path]:
        return [self.folder / item.data[0]]

    def load(self, item: WorkItem):
        rel, label = item.data
        try:  # a symlink that leads out of --root is skipped unless --allow-outside-root
            d = self.read_image(self.folder / rel, self.root, reduce_if_large(self.cfg.size))
        except ImageError as e:
            yield Skip(item.id, e.reason, e.detail)
            return
        # the key keeps the extension: a.jpg and a.png in one folder are two samples
        yield RawSample(key=rel, image=d.pixels, label=label, scale=d.scale, meta={"source_id": rel})
