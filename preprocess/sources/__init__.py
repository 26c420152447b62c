"""Registry of dataset sources for `preprocess build-shards SOURCE`.

Adding a source = one module under preprocess/sources/ (a `Source` subclass, see base.py) plus one
line below: name -> "module:Class". Modules are imported only when their source is used.
"""
from __future__ import annotations

import importlib

from preprocess.sources.base import RawSample, Shape, Skip, Source, SourceError, WorkItem

SOURCES: dict[str, str] = {
    "coco": "preprocess.sources.coco:CocoSource",
}


def get_source_class(name: str) -> type[Source]:
    if name not in SOURCES:
        raise SourceError(f"unknown source {name!r}; known: {', '.join(sorted(SOURCES))}")
    module, _, cls = SOURCES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["SOURCES", "get_source_class", "RawSample", "Shape", "Skip", "Source", "SourceError", "WorkItem"]
