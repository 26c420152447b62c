"""`sat-train` console script: one sub-command per module, each module owns its own flags.

    sat-train fit --shards shards/fashion-mnist/train --method sat --run runs/sat
    sat-train eval runs/sat --shards shards/fashion-mnist/test
    sat-train compare runs/* --out report/
    sat-train experiment grid.toml

Conventions shared by every command: see shards.cli.CONVENTIONS (printed by `sat-train --help`).
"""
from __future__ import annotations

from shards.dispatch import dispatch

COMMANDS = {
    "fit": ("sat_train.fit", "train a model on shards (standard, sat, pgd, trades, fgsm-rs, sat+pgd, sat+trades)"),
    "eval": ("sat_train.evaluate", "robustness of a trained run on evaluation shards"),
    "compare": ("sat_train.compare", "markdown table and plots over several runs"),
    "experiment": ("sat_train.experiment", "run a grid of fits, evaluate and compare them"),
    "teacher-saliency": ("sat_train.teacher", "a shard set whose saliency maps come from a trained teacher model"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("sat-train", COMMANDS, argv)
