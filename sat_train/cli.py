"""`sat-train` console script: one sub-command per module, each module owns its own flags.

    sat-train fit --shards shards/fashion-mnist/train --method sat --run runs/sat
    sat-train eval runs/sat --shards shards/fashion-mnist/test
    sat-train compare runs/* --out report/
    sat-train experiment grid.toml

Conventions shared by every command: see shards.cli.CONVENTIONS (printed by `sat-train --help`).
"""
from __future__ import annotations

import importlib
import sys

from shards.cli import CONVENTIONS

COMMANDS = {
    "fit": ("sat_train.fit", "train a model on shards (standard, sat, pgd, trades, fgsm-rs, sat+pgd, sat+trades)"),
    "eval": ("sat_train.evaluate", "robustness of a trained run on evaluation shards"),
    "compare": ("sat_train.compare", "markdown table and plots over several runs"),
    "experiment": ("sat_train.experiment", "run a grid of fits, evaluate and compare them"),
    "teacher-saliency": ("sat_train.teacher", "a shard set whose saliency maps come from a trained teacher model"),
}


def usage() -> str:
    lines = ["usage: sat-train COMMAND [options]   (sat-train COMMAND --help for its options)", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines + ["", CONVENTIONS])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sat-train: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)
