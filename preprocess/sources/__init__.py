"""Registry of dataset sources for `preprocess build-shards SOURCE`.

Adding a source = one module under preprocess/sources/ (a `Source` subclass, see base.py) plus one
line below: name -> "module:Class". Modules are imported only when their source is used.
"""
from __future__ import annotations

import importlib

from preprocess.sources.base import RawSample, Shape, Skip, Source, SourceError, WorkItem

SOURCES: dict[str, str] = {
    "coco": "preprocess.sources.coco:CocoSource",
    "fashion-mnist": "preprocess.sources.idx_mnist:FashionMnistSource",
    "mnist": "preprocess.sources.idx_mnist:MnistSource",
    "cifar10": "preprocess.sources.cifar:Cifar10Source",
    "cifar100": "preprocess.sources.cifar:Cifar100Source",
    "class-folders": "preprocess.sources.class_folders:ClassFolderSource",
    "tinyimagenet": "preprocess.sources.tinyimagenet:TinyImageNetSource",
    "mask-folders": "preprocess.sources.mask_folders:MaskFolderSource",
    "voc": "preprocess.sources.voc:VocSource",
}


def get_source_class(name: str) -> type[Source]:
    if name not in SOURCES:
        raise SourceError(f"unknown source {name!r}; known: {', '.join(sorted(SOURCES))}")
    module, _, cls = SOURCES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["SOURCES", "get_source_class", "RawSample", "Shape", "Skip", "Source", "SourceError", "WorkItem"]
