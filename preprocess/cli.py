"""`preprocess` console script: one sub-command per module, each module owns its flags.

    preprocess build-shards coco --annotations ann.json --images img/ --size 64 --out shards/coco/train
    preprocess verify shards/coco/train
    preprocess info shards/coco/train
    preprocess finalize shards/coco/train      (after a --num-nodes build)

Adding a sub-command = one line in COMMANDS: name -> (module with main(argv) -> int, help).
"""
from __future__ import annotations

import sys

from shards.dispatch import dispatch

COMMANDS = {
    "build-shards": ("preprocess.build_cli", "dataset + annotations -> saliency maps -> WebDataset shards"),
    "verify": ("preprocess.verify", "check every shard against the manifest (sha256, counts, decodes, indexes)"),
    "info": ("preprocess.info", "print a shard set's manifest in a readable form"),
    "finalize": ("preprocess.finalize", "write the manifest of a multi-node build once every node is done"),
    "preview": ("preprocess.preview", "a PNG grid of samples: image, saliency heat map, overlay"),
    "shuffle-saliency": ("preprocess.shuffle_saliency", "the `shuffled` control: each image gets another image's map"),
}


def _start_forkserver(name: str, args: list[str]) -> None:
    if name == "build-shards":
        from preprocess.workers import start_forkserver, workers_requested

        if workers_requested(args) > 1:  # before the heavy imports of the command: see preprocess/workers.py
            start_forkserver()


def main(argv: list[str] | None = None) -> int:
    return dispatch("preprocess", COMMANDS, argv, before=_start_forkserver)


if __name__ == "__main__":
    sys.exit(main())
