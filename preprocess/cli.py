"""`preprocess` console script: one sub-command per module, each module owns its flags.

    preprocess build-shards coco --annotations ann.json --images img/ --size 64 --out shards/coco/train
    preprocess verify shards/coco/train
    preprocess info shards/coco/train
    preprocess finalize shards/coco/train      (after a --num-nodes build)

Adding a sub-command = one line in COMMANDS: name -> (module with main(argv) -> int, help).
"""
from __future__ import annotations

import importlib
import sys

from shards.cli import CONVENTIONS

COMMANDS = {
    "build-shards": ("preprocess.build_cli", "dataset + annotations -> saliency maps -> WebDataset shards"),
    "verify": ("preprocess.verify", "check every shard against the manifest (sha256, counts, decodes, indexes)"),
    "info": ("preprocess.info", "print a shard set's manifest in a readable form"),
    "finalize": ("preprocess.finalize", "write the manifest of a multi-node build once every node is done"),
    "preview": ("preprocess.preview", "a PNG grid of samples: image, saliency heat map, overlay"),
    "shuffle-saliency": ("preprocess.shuffle_saliency", "the `shuffled` control: each image gets another image's map"),
}


def usage() -> str:
    lines = ["usage: preprocess COMMAND [options]   (preprocess COMMAND --help for its options)", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines + ["", CONVENTIONS])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "build-shards":
        from preprocess.workers import start_forkserver, workers_requested

        if workers_requested(rest) > 1:  # before the heavy imports below: see preprocess/workers.py
            start_forkserver()
    if name not in COMMANDS:
        print(f"preprocess: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        print(f"preprocess: command {name!r} is not available in this install ({e})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
